"""What an image records about how it was made, written with it and read back by `smd show` and
`smd reproduce`: PNG text chunks; in a JPEG or WebP the same chunks as one JSON document in its
XMP packet, with `parameters` also in EXIF UserComment as other tools expect it (a JPEG record
too large for its XMP segment goes to a sidecar `NAME.smd.yaml` instead).

Chunks (all text):
- `parameters`: a short human-readable summary, the kind other image tools show.
- `smd-scene`: the fully resolved scene as YAML: every default filled in, the seed, canvas size,
  step count and model settings made explicit, file paths made absolute and each file's SHA-256
  beside its path (`sha256`, `image_sha256`).
- `smd-files`: YAML mapping each file the scene reads (masks, palettes, the inpainting picture)
  to its SHA-256.
- `smd-name`, `smd-version`, `smd-seed`, `smd-model`, `smd-family` (`sd`, `sdxl`, `sd3` or `flux`), `smd-device`,
  `smd-dtype`: single values.
- `smd-timings`: JSON, seconds per stage.

Every chunk is UTF-8 text, also where a path or name has bytes that are not UTF-8 (a file name on
Linux may): YAML and JSON escape them (`\uDCE8`, Python's surrogate escape), and read them back
exactly; only `parameters`, for people, shows them as U+FFFD.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smd_cli import __version__
from smd_cli.core import defaults
from smd_cli.core.defaults import prefixed
from smd_cli.core.errors import SmdError, printable, unicode_text
from smd_cli.core.files import (
    MAX_IMAGE_BYTES,
    MAX_MODEL_BYTES,
    UnreadableFile,
    exists,
    expand_user,
    is_file,
    open_image,
    read_bytes,
    sha256,
)
from smd_cli.core.outputs import JPEG_SUFFIXES
from smd_cli.scenes.scene import SceneFile, control_files, lora_files, parse_mapping, scene_files, validate_scene


@dataclass
class Record:
    """How an image was made, as written into it."""

    scene: dict[str, Any]
    name: str
    seed: int
    model: str
    files: dict[str, str] = field(default_factory=dict)  # absolute path -> sha256
    version: str = __version__
    device: str = ""
    dtype: str = ""
    config: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    family: str = ""  # the model family (`smd_cli.families`; "" in records older than SDXL support)

    def scene_file(self) -> SceneFile:
        """The recorded scene, validated again; its paths are absolute, so it works from anywhere."""
        scene = dict(self.scene)
        if isinstance(scene.get("bootstrap"), dict) and "centre" not in scene["bootstrap"]:
            # Recorded before bootstrap.centre existed, when layers were never centred.
            scene["bootstrap"] = {**scene["bootstrap"], "centre": False}
        if scene.get("tile_stride") is None and scene.get("tile_size") and self.before_0_3:
            # Recorded before the stride was, when views stepped by half a tile.
            scene["tile_stride"] = scene["tile_size"] // 2
        sf = validate_scene(scene)
        sf.label = self.name
        return sf

    @property
    def before_0_3(self) -> bool:
        """Made by smd 0.2 or before (or a version this cannot read): views half a tile apart, and on
        a CPU the VAE in contiguous memory."""
        parts = self.version.split(".")[:2]
        release = tuple(int(p) for p in parts) if len(parts) == 2 and all(p.isdigit() for p in parts) else (0, 0)
        return release < (0, 3)

    def check_files(self) -> list[tuple[str, str]]:
        """(path, 'matches' | 'changed' | 'missing' | why it cannot be read) for every recorded file."""
        out = []
        for path, digest in self.files.items():
            try:
                status = "matches" if sha256(path) == digest else "changed"
            except FileNotFoundError:
                status = "missing"
            except UnreadableFile as exc:
                status = f"unreadable: {exc}"
            except OSError as exc:
                status = f"unreadable: {exc.strerror or exc}"
            out.append((path, status))
        return out


SHA256 = re.compile(r"[0-9a-f]{64}")


def resolved_scene(sf: SceneFile, *, seed: int, width: int, height: int, steps: int, model: str,
                   lcm_lora: str | None, vae: str | None, files: dict[Path, str],
                   tile_size: int | None = None) -> dict[str, Any]:
    """The scene with nothing left to a default: what `reproduce` needs to run it again."""
    data = sf.scene.model_dump(mode="json", exclude_none=False)
    for key, path in scene_files(sf).items():
        # The path made absolute, and the hash beside it: a scene run again warns when the file changed.
        if key == ("background", "image"):
            node, name, hash_key = data["background"], "image", "image_sha256"
        else:
            node = data["layers"][key[1]]["mask"]
            name, hash_key = ("image" if "image" in node else "palette"), "sha256"
        node[name] = str(path)
        if path in files:
            node[hash_key] = files[path]
    for key, path in control_files(sf).items():  # ControlNet and reference images: the same
        node = data
        for part in key:
            node = node[part]
        node["image"] = str(path)
        for name in ("model", "adapter"):  # local ControlNets and IP-Adapters made absolute
            if node.get(name):
                node[name] = _absolute(sf.source(node[name]))
        if path in files:
            node["sha256"] = files[path]
    for key, path in lora_files(sf).items():  # LoRAs and embeddings: the path absolute, and the file's hash
        node = data[key[0]][key[1]] if len(key) == 2 else data["layers"][key[1]]["loras"][key[3]]
        node["path"] = str(path)
        if path in files:
            node["sha256"] = files[path]
    if (data.get("hires") or {}).get("controlnet"):  # a local hires ControlNet made absolute
        data["hires"]["controlnet"] = _absolute(sf.source(data["hires"]["controlnet"]))
    data.update(seed=seed, width=width, height=height, model=_absolute(model), lcm_lora=lcm_lora or "none",
                vae=_absolute(vae) if vae else None, output=None)
    if data.get("timesteps") is None:
        data["steps"] = steps
    if data.get("tile_size") is None and tile_size:  # the model's native size, as it was then
        data["tile_size"] = tile_size
    if data.get("tile_stride") is None and data.get("tile_size"):  # the default stride, as it was then
        data["tile_stride"] = defaults.tile_stride(data["tile_size"])
    return {k: v for k, v in data.items() if v is not None}


def _absolute(source: str) -> str:
    """A local model path made absolute; a hub id or keyword as it is."""
    p = expand_user(source)
    return str(p.absolute()) if exists(p) else source


def make_record(sf: SceneFile, *, seed: int, width: int, height: int, steps: int, model: str,
                lcm_lora: str | None, vae: str | None, config: str | None, device: str, dtype: str,
                timings: dict[str, float], files: dict[Path, str] | None = None, family: str = "",
                tile_size: int | None = None) -> Record:
    """The record of an image. `files` are the hashes of the bytes the masks were made from (as
    `scene_masks` read them); files missing there are hashed now."""
    read = files or {}
    files = {path: read[path] if path in read else sha256(path)
             for path in (*scene_files(sf).values(), *control_files(sf).values()) if path in read or is_file(path)}
    files.update({path: sha256(path, MAX_MODEL_BYTES) for path in lora_files(sf).values() if is_file(path)})
    scene = resolved_scene(sf, seed=seed, width=width, height=height, steps=steps, model=model,
                           lcm_lora=lcm_lora, vae=vae, files=files, tile_size=tile_size)
    files = {str(path): digest for path, digest in files.items()}
    return Record(scene=scene, name=sf.name, seed=seed, model=scene["model"], files=files, device=device,
                  dtype=dtype, config=_absolute(config) if config else None,
                  timings={k: round(v, 4) for k, v in timings.items()}, family=family)


# The samplers as other image tools (AUTOMATIC1111's web UI and those that read its `parameters`) name them.
SAMPLER_NAMES = {"lcm": "LCM", "ddim": "DDIM", "euler": "Euler"}


def parameters_text(record: Record) -> str:
    """AUTOMATIC1111's layout, which other image tools read: the prompt, a `Negative prompt:` line,
    then one line of `Key: value` pairs (Steps, Sampler, CFG scale, Seed, Size, Model, ...)."""
    s = record.scene
    prompts = " | ".join(f"{layer['name']}: {layer['prompt']}" for layer in s["layers"])
    if s["background"].get("prompt"):
        prompts = f"background: {s['background']['prompt']} | {prompts}"
    prefix = s.get("negative_prefix")
    negatives = [prefixed(prefix, layer["negative_prompt"]) for layer in s["layers"]]
    if s["background"].get("negative_prompt"):
        negatives.insert(0, prefixed(prefix, s["background"]["negative_prompt"]))
    negatives = [n for n in dict.fromkeys(negatives) if n]  # as the layers use them, each once
    steps = s.get("steps") or len(s.get("timesteps") or [])
    pairs = {"Steps": steps, "Sampler": SAMPLER_NAMES.get(s["scheduler"], s["scheduler"]),
             "CFG scale": s["guidance_scale"], "Seed": record.seed,
             "Size": f"{s['width']}x{s['height']}", "Model": record.model,
             **({"Model family": record.family} if record.family else {}), "Layers": len(s["layers"]),
             "Version": f"smd {record.version}"}
    lines = [prompts] + ([f"Negative prompt: {'; '.join(negatives)}"] if negatives else [])
    # For people and other tools: a byte of a name that is not UTF-8 shows as U+FFFD.
    return unicode_text("\n".join(lines + [", ".join(f"{k}: {v}" for k, v in pairs.items())]))


def chunks(record: Record) -> dict[str, str]:
    """The record as named texts: PNG text chunks, or the fields of the XMP document. Each is text
    that UTF-8 can hold, also where a path in it has bytes that are not UTF-8 (`_exact`)."""
    out = {
        "parameters": parameters_text(record),
        "smd-scene": dump_yaml(record.scene),  # YAML escapes such a byte (`\uDCE8`) and reads it back
        "smd-files": dump_yaml(record.files) if record.files else "{}\n",
        "smd-name": _exact(record.name),
        "smd-version": record.version,
        "smd-seed": str(record.seed),
        "smd-model": _exact(record.model),
        "smd-family": record.family,
        "smd-device": record.device,
        "smd-dtype": record.dtype,
        "smd-timings": json.dumps(record.timings),
    }
    if record.config:
        out["smd-config"] = _exact(record.config)
    return out


def _exact(value: str) -> str:
    """A single-valued chunk as it is, or, where UTF-8 cannot hold it (a name with bytes that are
    not UTF-8) or it starts with a quote, as a JSON string with escapes, which `_read_exact` undoes."""
    return json.dumps(value) if value.startswith('"') or unicode_text(value) != value else value


def _read_exact(value: Any) -> Any:
    if isinstance(value, str) and value.startswith('"'):
        with contextlib.suppress(ValueError):
            decoded = json.loads(value)
            return decoded if isinstance(decoded, str) else value
    return value


def png_info(record: Record):
    """The record as PNG text chunks (PIL's PngInfo; UTF-8 iTXt where needed)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks(record).items():
        info.add_itxt(key, value)
    return info


XMP_NAMESPACE = "https://github.com/smd-cli/smd/ns/record/1.0/"
MAX_JPEG_SEGMENT = 65_000  # a JPEG APP1 segment (XMP or EXIF) holds 64 KiB, its header included


def xmp_packet(record: Record) -> bytes:
    """An XMP packet holding the record's chunks as one JSON document, in the `smd:record` attribute."""
    from xml.sax.saxutils import quoteattr

    document = quoteattr(json.dumps(chunks(record), ensure_ascii=False))
    return ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:smd="{XMP_NAMESPACE}" smd:record={document}/>'
            '</rdf:RDF></x:xmpmeta>').encode("utf-8")


def exif_comment(text: str):
    """EXIF whose UserComment is `text` (UTF-16, as AUTOMATIC1111's JPEGs carry `parameters`)."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")  # Exif IFD, UserComment
    return exif


def save_options(record: Record, path: Path) -> tuple[dict[str, Any], Path | None]:
    """How to write `record` into an image at `path`: Pillow's save options, and the sidecar file
    to write instead where the image cannot hold it (a JPEG's XMP segment is too small)."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return {"pnginfo": png_info(record)}, None
    xmp = xmp_packet(record)
    exif = exif_comment(parameters_text(record))
    if suffix not in JPEG_SUFFIXES:
        return {"exif": exif, "xmp": xmp}, None
    # Too long a prompt for the EXIF segment: the parameters are in the record, so leave them out.
    options = {"exif": exif} if len(exif.tobytes()) <= MAX_JPEG_SEGMENT else {}
    if len(xmp) > MAX_JPEG_SEGMENT:
        return options, path.with_suffix(".smd.yaml")
    return {**options, "xmp": xmp}, None


def write_sidecar(record: Record, image: Path, overwrite: bool = False) -> Path:
    """The record beside the image it describes, as `NAME.smd.yaml`."""
    from smd_cli.core.outputs import write_atomic

    text = dump_yaml(chunks(record)).encode("utf-8")
    return write_atomic(image.with_suffix(".smd.yaml"), lambda fh: fh.write(text), overwrite)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def read_record(path: str | Path) -> Record:
    """The record of an image made by smd, or someone else's image: every field is checked as the
    untrusted input it is. `SmdError` when there is none or it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = read_bytes(path, MAX_IMAGE_BYTES)
        with open_image(io.BytesIO(data)) as image:
            image.load()  # text chunks may follow the pixels; PIL bounds each chunk's size
            text = {str(k): str(v) for k, v in (getattr(image, "text", {}) or {}).items()}
            xmp = image.info.get("xmp")
    except FileNotFoundError:
        raise SmdError(f"{path}: file not found") from None
    except UnreadableFile as exc:
        raise SmdError(f"{path}: cannot read the image: it is {exc}") from None
    except UnidentifiedImageError:
        raise SmdError(f"{path}: cannot read the image: not an image PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # PIL: truncated, chunk limits
        raise SmdError(f"{path}: cannot read the image ({exc})") from None
    if "smd-scene" not in text:
        text = _xmp_chunks(xmp, path) or _sidecar_chunks(path)
    if "smd-scene" not in text:
        raise SmdError(f"{path}: no smd metadata in this image (smd records it in the images it writes)")
    try:  # the scene loader's parser: bounded, so a crafted chunk cannot expand without end
        scene, _ = parse_mapping(text["smd-scene"], path)
        recorded, _ = parse_mapping(text.get("smd-files", "{}"), path, allow_empty=True)
        timings = json.loads(text.get("smd-timings", "{}"))
        seed = int(text.get("smd-seed", scene.get("seed")))
    except (SmdError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise SmdError(f"{path}: the smd metadata is damaged ({printable(str(exc))})") from None
    problem = _record_problem(scene, recorded, timings, seed)
    if problem:
        raise SmdError(f"{path}: the smd metadata is damaged ({problem})")
    return Record(scene=scene, name=_read_exact(text.get("smd-name", path.stem)), seed=seed,
                  model=_read_exact(text.get("smd-model", scene.get("model", ""))), files=recorded,
                  version=text.get("smd-version", "?"), device=text.get("smd-device", ""),
                  dtype=text.get("smd-dtype", ""), config=_read_exact(text.get("smd-config")), timings=timings,
                  family=text.get("smd-family", ""))


def _xmp_chunks(xmp: Any, path: Path) -> dict[str, str]:
    """The chunks of an XMP packet written by `xmp_packet`, or {} for any other XMP."""
    import html

    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    found = re.search(r'smd:record="([^"]*)"', xmp) if isinstance(xmp, str) else None
    if found is None:
        return {}
    try:
        document = json.loads(html.unescape(found.group(1)))
    except (ValueError, RecursionError) as exc:
        raise SmdError(f"{path}: the smd metadata is damaged ({printable(str(exc))})") from None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise SmdError(f"{path}: the smd metadata is damaged (the XMP record is not a mapping of texts)")
    return document


def _sidecar_chunks(image: Path) -> dict[str, str]:
    """The chunks of the sidecar `NAME.smd.yaml` beside an image, or {} when there is none."""
    sidecar = image.with_suffix(".smd.yaml")
    try:
        document, _ = parse_mapping(read_bytes(sidecar, MAX_IMAGE_BYTES).decode("utf-8"), sidecar)
    except FileNotFoundError:
        return {}
    except (SmdError, UnicodeDecodeError) as exc:
        raise SmdError(f"{sidecar}: the smd metadata is damaged ({printable(str(exc))})") from None
    if not all(isinstance(v, str) for v in document.values()):
        raise SmdError(f"{sidecar}: the smd metadata is damaged (not a mapping of texts)")
    return document


def _record_problem(scene: Any, recorded: Any, timings: Any, seed: int) -> str | None:
    """What is wrong with the fields of a record read from an image, if anything."""
    if not isinstance(scene, dict):
        return "the scene is not a mapping"
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v)
                                                 for k, v in recorded.items()):
        return "smd-files is not a mapping of paths to SHA-256 hashes"
    if not isinstance(timings, dict) or not all(isinstance(v, (int, float)) for v in timings.values()):
        return "smd-timings is not a mapping of seconds"
    if not 0 <= seed < 2**63:
        return f"the seed {seed} is out of range"
    return None


def as_dict(record: Record) -> dict[str, Any]:
    """Everything recorded, with each file's hash checked now, for `smd show`."""
    files = {path: {"sha256": record.files[path], "now": status} for path, status in record.check_files()}
    doc = {"name": record.name, "smd": record.version, "model": record.model, "family": record.family or None,
           "seed": record.seed, "device": record.device, "dtype": record.dtype, "timings": record.timings}
    if record.config:
        doc["config"] = record.config
    doc.update(files=files, scene=record.scene)
    return doc


def describe(record: Record) -> str:
    """`as_dict` as one YAML document."""
    return dump_yaml(as_dict(record))


@dataclass
class Comparison:
    """How a reproduced image compares with the original, pixel by pixel."""

    identical: bool
    summary: str  # one line for people


def compare_images(original: Path, new: Path) -> Comparison:
    """Whether two images have the same pixels, and if not, how much they differ."""
    import numpy as np
    from PIL import Image

    with Image.open(original) as a, Image.open(new) as b:
        x, y = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    if x.shape != y.shape:
        return Comparison(False, f"differs from {original}: {y.shape[1]}x{y.shape[0]} instead of "
                                 f"{x.shape[1]}x{x.shape[0]}")
    if (x == y).all():
        return Comparison(True, f"identical to {original}")
    diff = np.abs(x - y)
    return Comparison(False, f"differs from {original}: {100 * (diff.max(-1) > 0).mean():.1f}% of pixels, by up to "
                             f"{int(diff.max())} of 255 (another device or dtype, or changed files)")


__all__ = ["Record", "make_record", "png_info", "read_record", "as_dict", "describe", "compare_images", "sha256"]
