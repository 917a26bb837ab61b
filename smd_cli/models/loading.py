"""Model loading: hub ids, local diffusers folders and single files; devices, dtypes, the LCM LoRA.

Reading a model's configs (its family, its canvas grid, what is downloaded) loads nothing and needs
no torch, so the planners and `smd validate` use it; loading imports torch and diffusers inside the
functions that load (docs/development.md#the-torch-boundary). Which family a model is and what that
family needs come from `smd_cli.families`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smd_cli.core import defaults
from smd_cli.core.errors import ModelError, printable, unicode_text
from smd_cli.core.files import exists, expand_user, is_dir, is_file
from smd_cli.families import default_grid, family_of, guidance_distilled, named, of_checkpoint
from smd_cli.families.base import vae_factor

if TYPE_CHECKING:
    import torch

    from smd_cli.families import Family
    from smd_cli.method.views import Grid

# diffusers and transformers log notes at import time (optional backends, deprecations) that mean
# nothing to an smd user; these must be set before either library is first imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Where a model folder keeps its denoiser's config: a UNet's, else a transformer's (SD3).
DENOISER_CONFIGS = ("unet/config.json", "transformer/config.json")


class SlowDeviceWarning(UserWarning):
    """Generation on the CPU works but is slow."""


@dataclass
class Components:
    """The loaded parts of a Stable Diffusion (1.x, 2.x, XL or 3) model, ready on one device."""

    denoiser: Any  # a UNet, or on SD3 and FLUX.1 a transformer
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    source: str = "<components>"
    lcm_lora: str | None = None
    vae_source: str | None = None
    config: str | None = None  # the folder whose configs a single-file model was read with
    text_encoder_2: Any = None  # SDXL's second encoder (with projection) and its tokenizer
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zero conditioning
    text_encoder_3: Any = None  # SD3's T5 and its tokenizer (None: left out)
    tokenizer_3: Any = None

    @property
    def family(self) -> str:
        return family_of(self.denoiser.config)


def denoiser_config(model: str | None, config: str | None = None) -> dict | None:
    """The denoiser's config (a UNet's or a transformer's) of a model folder or hub id, or of the
    `config` folder a single file is read with; None when not at hand. Loads nothing."""
    source = config or model
    for name in DENOISER_CONFIGS:
        found = config_json(source, name)
        if found is not None:
            return found
    return None


def model_family(model: str | None, config: str | None = None) -> str | None:
    """A model's family, read from its UNet config (a local folder, the hub cache, or `config` for a
    single file) or a single .safetensors file's key names, loading nothing; None when unknown."""
    unet = denoiser_config(model, config)
    if unet is not None:
        return family_of(unet)
    path = expand_user(model or defaults.MODEL)
    if is_file(path) and path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:  # the header only
                keys = list(handle.keys())
        except Exception:  # not a checkpoint safetensors can open: diffusers says why when it loads
            return None
        return of_checkpoint(keys)
    return None


def model_grid(model: str | None, config: str | None = None) -> Grid | None:
    """What a model asks of a canvas (`views.Grid`: its family, VAE factor, the denoiser's granularity
    and the size default views are chosen from), read from its configs as its family reads them,
    loading nothing. None where its factor is not known before it loads (a hub model not downloaded
    yet; `smd_cli.scenes.presets.model_grid` knows a preset's)."""
    if (model or defaults.MODEL) == defaults.MODEL:
        return default_grid()
    family = model_family(model, config)
    factor = vae_downscale_factor(model) or (vae_downscale_factor(config) if config else None)
    if family is None or factor is None:
        return None
    return named(family).grid_of(denoiser_config(model, config) or {}, factor)


def resolve_device(device: Any = None) -> torch.device:
    """`auto`/None picks CUDA, then MPS, then the CPU; an int N means `cuda:N`."""
    import torch

    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device(f"cuda:{device}")
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return resolved


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """`auto`/None: float16 on CUDA and MPS, float32 on the CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return getattr(torch, dtype)


def dtype_name(dtype: Any) -> str:
    """`float16` for torch.float16: how a dtype is said and recorded."""
    return str(dtype).removeprefix("torch.")


def set_threads(count: int) -> None:
    """Let torch use `count` CPU threads: on a busy machine, fewer threads than cores avoid threads
    fighting over the same cores, which can slow generation many times."""
    import torch

    torch.set_num_threads(count)


def warn_if_slow(device: torch.device) -> None:
    if device.type == "cpu":
        warnings.warn("running on the CPU: this works but is slow; a CUDA GPU is much faster",
                      SlowDeviceWarning, stacklevel=3)


def _looks_like_path(name: str) -> bool:
    """Anything but `owner/name` is a path: hub ids have exactly one slash and no file suffix."""
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) is None or name.endswith(SINGLE_FILE_SUFFIXES)


def hub_file(name: str) -> tuple[str, str] | None:
    """`owner/name/file.safetensors`, one file of a hub repository (as LoRA repositories that hold
    several ship them), as (repository, file); None for anything else, a local file included."""
    m = re.fullmatch(r"([\w-][\w.-]*/[\w.-]+)/([\w./-]+\.safetensors)", name)
    if m is None or exists(expand_user(name)):
        return None
    return m.group(1), m.group(2)


def config_json(model: str | None, name: str) -> dict | None:
    """A component's config (`vae/config.json`) from a local folder or the hub cache, loading nothing."""
    model = model or defaults.MODEL
    path = expand_user(model)
    config: Path | None = None
    if is_dir(path):
        config = path / name
    elif not _looks_like_path(model):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, name)
            config = Path(found) if isinstance(found, str) else None
        except Exception:  # a cache lookup must never stop validation
            config = None
    if config is None or not is_file(config):
        return None
    try:
        data = json.loads(config.read_text())
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def vae_downscale_factor(model: str | None) -> int | None:
    """The VAE's downscale factor, read from a local or cached config without loading anything; the
    default model's is known before it is downloaded, any other's is None until then."""
    config = config_json(model, "vae/config.json")
    if config is None:
        return defaults.MODEL_VAE_FACTOR if (model or defaults.MODEL) == defaults.MODEL else None
    try:
        return vae_factor(config)
    except (KeyError, TypeError):
        return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# The files smd needs of each kind of repository, so that a download fetches no other checkpoint.
NEEDED_FILES = {"model": ('"*.json"', '"*.txt"', '"*/diffusion_pytorch_model.safetensors"',
                          '"text_encoder/model.safetensors"', '"text_encoder_2/model.safetensors"'),
                "LCM LoRA": ('"*.safetensors"',), "LoRA": ('"*.safetensors"',),
                "VAE": ("config.json", "diffusion_pytorch_model.safetensors"),
                "ControlNet": ("config.json", "diffusion_pytorch_model.safetensors")}
LORA_FILE = "pytorch_lora_weights.safetensors"


def download_command(name: str, what: str = "model") -> str:
    """The `hf download` command that fetches what smd needs of a hub repository."""
    return f"hf download {name} --include {' '.join(NEEDED_FILES.get(what, NEEDED_FILES['model']))}"


def _not_cached_message(name: str, what: str = "model") -> str:
    return (f"{what} '{name}' is not a local folder or file and is not in the Hugging Face cache, "
            "and the hub cannot be reached; download it once on a machine with network access "
            f"(`{download_command(name, what)}`), or pass a local "
            + ("diffusers folder or .safetensors file" if what == "model" else "one") + "")


def in_cache(name: str, filename: str) -> bool:
    """Whether a hub repository's file is in the local Hugging Face cache (asks no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, filename), str)
    except Exception:  # a cache lookup must never stop a run
        return False


def _quiet_hub():
    """diffusers and transformers print loading bars and notes; smd shows its own progress."""
    # diffusers renames `torch_dtype`; the old name works across the supported versions.
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    for name in ("transformers", "huggingface_hub", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def check_source(model: str | None) -> None:
    """Fail early, before slow imports, for a local model path that does not exist (a hub id is
    checked with the scenes, by `check_available`)."""
    if model and _looks_like_path(model):
        check_available(model)


# The file that shows a hub repository of each kind is in the cache, and how a missing local one is said.
KEY_FILES = {"model": "model_index.json", "LCM LoRA": LORA_FILE, "LoRA": LORA_FILE, "VAE": "config.json",
             "ControlNet": "config.json", "embedding": "learned_embeds.safetensors",
             "IP-Adapter": "models/ip-adapter_sd15.safetensors"}
NOT_FOUND = {"model": "model folder or file not found", "LCM LoRA": "LCM LoRA file or folder not found",
             "LoRA": "LoRA file or folder not found", "VAE": "VAE folder not found",
             "ControlNet": "ControlNet folder not found", "embedding": "embedding file not found",
             "IP-Adapter": "IP-Adapter file not found"}


# Where the Hugging Face hub keeps what it downloads, when not in ~/.cache/huggingface.
HUB_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def check_hub_cache(name: str, what: str = "model") -> None:
    """Refuse a hub id where there is no Hugging Face cache to keep it in: no home folder (a service
    account) and no variable naming one, where the hub's libraries would make a folder `~` here."""
    from smd_cli.core.files import no_home

    missing = None if any(os.environ.get(v) for v in HUB_CACHE_VARIABLES) else no_home()
    if missing:
        raise ModelError(f"{what} '{name}' comes from the Hugging Face hub, whose cache is in the home folder, and "
                         f"there is none ({missing}); set HF_HOME to a folder for the cache, or use a local {what}")


def check_available(name: str | None, what: str = "model") -> str | None:
    """Fail now for a model, LCM LoRA or VAE that cannot be had: a local path that is not there,
    or a hub id not in the cache while offline (or with no cache at all). Returns a note when that
    cannot be known yet (a hub id not downloaded, with the hub reachable)."""
    if not name:
        return None
    hub = hub_file(name)
    if hub is not None or not _looks_like_path(name):
        check_hub_cache(name, what)
    if hub is not None:
        if in_cache(*hub):
            return None
        if _offline():
            error = ModelError(f"{what} '{name}' is not in the Hugging Face cache, and the hub cannot be reached; "
                               f"download it once on a machine with network access (`hf download {hub[0]} {hub[1]}`)")
            error.offline = True
            raise error
        return f"{what} {name} is not downloaded yet: it is fetched when it loads"
    if _looks_like_path(name):
        if not exists(expand_user(name)):
            raise ModelError(f"{NOT_FOUND[what]}: {expand_user(name)}")
        if unicode_text(name) != name:  # safetensors takes paths as UTF-8 text only
            raise ModelError(f"{what} {printable(name)}: its path has bytes that are not UTF-8, which the "
                             "safetensors library cannot open; rename it, or link to it from a UTF-8 path")
        return None
    if in_cache(name, KEY_FILES[what]):
        return None
    if _offline():
        error = ModelError(_not_cached_message(name, what))
        error.offline = True
        raise error
    return f"{what} {name} is not downloaded yet: it is fetched, and checked, when it loads"


@contextlib.contextmanager
def _loading(name: str, what: str, hint: str = "", offline: str | None = None):
    """Turn the many exceptions diffusers and the hub raise for a model they cannot get into one line.

    `offline` replaces the message for a hub that cannot be reached.
    """
    if hub_file(name) is not None or not (_looks_like_path(name) or exists(expand_user(name))):
        check_hub_cache(name, what)
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        from huggingface_hub.errors import RepositoryNotFoundError

        chain = _exception_chain(exc)
        if any(_unreachable(e) for e in chain):
            error = ModelError(offline or (_not_cached_message(name, what) + hint))
            error.offline = True
            raise error from None
        if any(isinstance(e, RepositoryNotFoundError) for e in chain):
            raise ModelError(f"{what} '{name}' does not exist on the Hugging Face hub (or is private)") from None
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ModelError(f"cannot load {what} '{name}': {first}{hint}") from None


OFFLINE_SIGNS = ("offline", "cannot find the requested files", "connection", "name or service not known",
                 "temporary failure in name resolution", "max retries", "timed out", "network is unreachable")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _unreachable(exc: BaseException) -> bool:
    """Whether an exception means the hub could not be reached (or was not to be asked)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    name, text = type(exc).__name__.lower(), str(exc).lower()
    return "connect" in name or "timeout" in name or any(sign in text for sign in OFFLINE_SIGNS)


def load_pipeline(model: str, *, dtype: torch.dtype, config: str | None = None):
    """The diffusers pipeline of the model's family (SD, SDXL, SD3 or FLUX.1, as the denoiser's
    config says) from a hub id, a local folder or, for SD and SDXL, a single file."""
    _quiet_hub()
    path = expand_user(model)
    if is_file(path) or model.endswith(SINGLE_FILE_SUFFIXES):
        if not is_file(path):
            raise ModelError(f"model file not found: {path}")
        if config is None:
            hint = "; pass a local diffusers folder of the same architecture with --config DIR"
            offline = (f"cannot load single-file model {path}: diffusers needs the configs of its architecture "
                       "and cannot reach the Hugging Face hub for them" + hint)
            with _loading(str(path), "single-file model", hint, offline):
                cls = _pipeline_class(model_family(model))
                return cls.from_single_file(str(path), **_loading_options(cls, dtype))
        if not is_file(Path(config) / "model_index.json"):
            raise ModelError(f"--config {config} is not a diffusers model folder (it has no model_index.json)")
        with _loading(str(path), "single-file model", f" (with the configs of {config})"):
            cls = _pipeline_class(model_family(model, config))
            return cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                        **_loading_options(cls, dtype))
    if is_dir(path):
        if not is_file(path / "model_index.json"):
            raise ModelError(f"model folder {path} has no model_index.json; it is not a diffusers model folder")
        with _loading(str(path), "model"):
            cls = _pipeline_class(model_family(str(path)))
            return cls.from_pretrained(str(path), local_files_only=True, **_loading_options(cls, dtype, path))
    if _looks_like_path(model):
        raise ModelError(f"model folder or file not found: {path}")
    with _loading(model, "model"):
        family = model_family(model)
        if family is None:  # not in the cache yet: its denoiser's config says which pipeline to download
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                found = hf_hub_download(model, DENOISER_CONFIGS[0], local_files_only=_offline())
            except EntryNotFoundError:
                found = hf_hub_download(model, DENOISER_CONFIGS[1], local_files_only=_offline())
            family = family_of(json.loads(Path(found).read_text()))
        cls = _pipeline_class(family)
        return cls.from_pretrained(model, local_files_only=_offline(), **_loading_options(cls, dtype))


def _pipeline_class(family: str | None):
    import diffusers

    return getattr(diffusers, named(family or "sd").pipeline)


def _loading_options(cls, dtype: torch.dtype, folder: Path | None = None) -> dict:
    """`from_pretrained` options: the dtype, no safety checker where the pipeline has one, and no
    T5 for an SD3 folder that has none (it conditions on the CLIP encoders alone)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    options: dict[str, Any] = dict(torch_dtype=dtype)
    if "safety_checker" in accepted:
        options.update(safety_checker=None, requires_safety_checker=False, feature_extractor=None)
    if "text_encoder_3" in accepted and folder is not None and not is_dir(folder / "text_encoder_3"):
        options.update(text_encoder_3=None, tokenizer_3=None)
    return options


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def vae_source(vae: str, family: str = "sd") -> str:
    """The hub id or folder a `--vae` value names: `tiny` is the family's TAESD (taesd, taesdxl,
    taesd3 or taef1)."""
    return named(family).tiny_vae if vae == "tiny" else vae


def load_vae(vae: str, *, dtype: torch.dtype, family: str = "sd"):
    """An autoencoder to replace the model's: `tiny` (the family's TAESD), or a hub id or local
    folder of one, loaded as the class its config.json names."""
    import diffusers

    name = vae_source(vae, family)
    path = expand_user(name)
    local = is_dir(path)
    if not local and _looks_like_path(name):
        raise ModelError(f"VAE folder not found: {path}")
    with _loading(str(path) if local else name, "VAE", "" if local else "; or leave out --vae for the model's own"):
        config = config_json(str(path) if local else name, "config.json")
        if config is None and local:
            raise ModelError(f"VAE folder {path} has no config.json")
        if config is None:  # not in the hub cache yet
            from huggingface_hub import hf_hub_download

            config = json.loads(Path(hf_hub_download(name, "config.json", local_files_only=_offline())).read_text())
        kind = config.get("_class_name")
        if kind not in VAE_CLASSES:
            raise ModelError(f"VAE {name}: its config.json names {kind!r}, not an autoencoder smd can use "
                             f"({', '.join(VAE_CLASSES)})")
        return getattr(diffusers, kind).from_pretrained(str(path) if local else name, torch_dtype=dtype,
                                                        local_files_only=local or _offline())


def lcm_lora_fits(unet) -> bool:
    """The SD1.5 LCM LoRA fits an SD1.x UNet that is not already LCM-distilled."""
    return fits_lcm_lora(unet.config)


def fits_lcm_lora(unet_config) -> bool:
    """`lcm_lora_fits` from a UNet's config alone: not distilled already, and of the width its
    family's LCM LoRA was trained on."""
    width = named(family_of(unet_config)).lcm_lora_width  # None: the family has no LCM LoRA (SD3)
    return not guidance_distilled(unet_config) and width is not None and unet_config.get("cross_attention_dim") == width


def chosen_lcm_lora(lcm_lora: str | None, unet_config) -> str | None:
    """The LCM LoRA a `--lcm-lora` value asks for on a UNet with this config: `auto` its family's
    (SD 1.5's or SDXL's) where it fits (`fits_lcm_lora`), `none` (or None) none, anything else itself."""
    if lcm_lora == "auto":
        return named(family_of(unet_config)).lcm_lora if fits_lcm_lora(unet_config) else None
    return None if lcm_lora in (None, "none") else lcm_lora


def apply_lcm_lora(pipe, lcm_lora: str | None) -> str | None:
    """Fuse an LCM LoRA (`chosen_lcm_lora`) into the UNet; returns the one fused, if any."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    lcm_lora = chosen_lcm_lora(lcm_lora, denoiser.config)
    if lcm_lora is None:
        return None
    family = family_of(denoiser.config)
    name = named(family).label
    other = f"; {name}'s is {named(family).lcm_lora}" if named(family).lcm_lora else ""
    load_lora(pipe, lcm_lora, "LCM LoRA", instead="--lcm-lora none", hint=" (use --lcm-lora none for a model that "
              "needs none)", other=other)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return lcm_lora


def load_lora(pipe, source: str, what: str, *, adapter_name: str | None = None, instead: str = "",
              hint: str = "", other: str = "") -> None:
    """Load a LoRA (a file, a folder, a hub id, or `owner/name/file.safetensors`) into a diffusers
    pipeline as an adapter; one that does not fit the model, or matches none of its layers (which
    diffusers loads silently), is a `ModelError` that says `what` it is and what to do `instead`."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    path = expand_user(source)
    name = named(family_of(denoiser.config)).label
    before = set(getattr(denoiser, "peft_config", {}))
    options = {"adapter_name": adapter_name} if adapter_name else {}
    otherwise = f", or {instead}" if instead else ""
    with _loading(source, what, hint), _silenced("diffusers"):  # it logs, then raises: we say it once
        try:
            hub = hub_file(source)
            if hub is not None:
                pipe.load_lora_weights(hub[0], weight_name=hub[1], local_files_only=_offline(), **options)
            elif is_file(path):
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, **options)
            elif is_dir(path):
                pipe.load_lora_weights(str(path), **options)
            elif _looks_like_path(source):
                raise ModelError(f"{what} file or folder not found: {path}")
            else:
                pipe.load_lora_weights(source, local_files_only=_offline(), **options)
        except (RuntimeError, ValueError) as exc:
            if adapter_name and any(adapter_name in names for names in pipe.get_list_adapters().values()):
                pipe.delete_adapters(adapter_name)  # what loaded before the failure goes too
            if "size mismatch" not in str(exc):
                raise
            raise ModelError(f"{what} '{source}' does not fit this {name} model: its layers have other sizes "
                             f"(a LoRA for another model family?){other}{otherwise}") from None
        added = set(getattr(denoiser, "peft_config", {})) - before
        if not added:
            if adapter_name is None:
                pipe.unload_lora_weights()
            elif any(adapter_name in names for names in pipe.get_list_adapters().values()):
                pipe.delete_adapters(adapter_name)  # it matched the text encoders only
            raise ModelError(f"{what} '{source}' has no layers of this {name} model's denoiser (a LoRA for "
                             f"another model family?), so it would change nothing; use a LoRA made for {name}"
                             f"{otherwise}")


@contextlib.contextmanager
def _silenced(name: str):
    """No log records from the logger `name` (and its children) inside the block."""
    log = logging.getLogger(name)
    saved = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(saved)


def check_runnable(model: str, unet_config, *, has_text_encoder: bool = True) -> None:
    """Refuse, with the reason, the models of a family that the region sampler cannot drive
    (inpainting UNets' 9 channels, SDXL's refiner: each family's `check`)."""
    if unet_config is not None:
        named(family_of(unet_config)).check(model, unet_config, has_text_encoder=has_text_encoder)


def load_components(model: str | None = None, *, device: torch.device, dtype: torch.dtype,
                    lcm_lora: str | None = "auto", config: str | None = None, vae: str | None = None,
                    offload: bool = False) -> Components:
    """Load a model onto `device`, with the LCM LoRA fused and the VAE replaced where asked for. With
    `offload` (a GPU only) the weights stay in CPU memory and diffusers' model CPU offload moves each
    model to the GPU when it runs and back when the next one starts."""
    if offload and device.type != "cuda":
        raise ModelError(f"--offload moves each model to the GPU while it runs: it needs a CUDA device, not {device}")
    model = model or defaults.MODEL
    check_runnable(model, denoiser_config(model, config))
    try:
        pipe = load_pipeline(model, dtype=dtype, config=config)
    except ModelError as exc:  # offline: name every download the run needs, not only the first
        family = model_family(model, config) or "sd"
        lora = named(family).lcm_lora if lcm_lora == "auto" else lcm_lora
        if exc.offline and lora and lora != "none" and not _looks_like_path(lora) and not in_cache(lora, LORA_FILE):
            more = ModelError(f"{exc}; then the LCM LoRA too: `{download_command(lora, 'LCM LoRA')}`")
            more.offline = True
            raise more from None
        raise
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    check_runnable(model, denoiser.config, has_text_encoder=getattr(pipe, "text_encoder", None) is not None)
    applied = apply_lcm_lora(pipe, lcm_lora)
    family = family_of(denoiser.config)
    if vae:
        pipe.vae = load_vae(vae, dtype=dtype, family=family)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return Components(denoiser=denoiser, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                      scheduler_config=dict(pipe.scheduler.config), source=model, lcm_lora=applied,
                      vae_source=vae_source(vae, family) if vae else None, config=config,
                      text_encoder_2=getattr(pipe, "text_encoder_2", None),
                      tokenizer_2=getattr(pipe, "tokenizer_2", None),
                      text_encoder_3=getattr(pipe, "text_encoder_3", None),
                      tokenizer_3=getattr(pipe, "tokenizer_3", None),
                      force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)))


def make_family(components: Components, *, device: torch.device, dtype: torch.dtype) -> Family:
    """The family of a loaded model (chosen by its denoiser's config), with what acts on its rows:
    LoRAs, reference images through an IP-Adapter, ControlNets (`smd_cli.models`)."""
    from smd_cli.models.controls import ControlNets
    from smd_cli.models.loras import LoraAdapters
    from smd_cli.models.references import References

    cls = named(components.family)
    family = cls(components, device=device, dtype=dtype)
    family.loras = LoraAdapters(components)
    family.references = References(family.loras.loader, cls, device, dtype)
    family.controlnets = ControlNets(components.denoiser, device=device, dtype=dtype, factor=family.factor,
                                     encode=family.encode_image if cls.control_latents else None)
    return family
