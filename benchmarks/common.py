"""Shared helpers of the benchmark scripts: models, measurements, machine facts and the records.

Benchmarks report, they never assert. Every script runs on random weights saved as a real local
diffusers folder, so smd and diffusers load exactly the same UNet, VAE and text encoder, and only
the samplers differ.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random local weights only; nothing is downloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep the tables readable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"  # one JSON Lines file of records per device
TESTS = REPO / "tests"
REFERENCE = REPO.parent / "shared" / "reference-scenes"
SIZES = ("cpu", "full")

# Eight regions in fractions of the canvas, after the irworobongdo scene's layout: mountains, sun,
# moon, two waterfalls, lake, two trees. Used wherever the published masks are not at hand.
SHAPES: list[tuple[str, tuple[float, float, float, float]]] = [
    ("rect", (0.0, 0.40, 1.0, 0.75)),
    ("ellipse", (0.15, 0.20, 0.06, 0.15)),
    ("ellipse", (0.85, 0.20, 0.05, 0.12)),
    ("rect", (0.30, 0.25, 0.40, 0.80)),
    ("rect", (0.60, 0.25, 0.70, 0.80)),
    ("rect", (0.0, 0.75, 1.0, 1.0)),
    ("ellipse", (0.08, 0.60, 0.07, 0.30)),
    ("ellipse", (0.92, 0.60, 0.07, 0.30)),
]


# -----------------------------------------------------------------------------------------------
# Command line


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="cpu: small canvases for tiny models; full: the published sizes "
                             "(default: cpu on the CPU, full elsewhere)")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on the CPU), float32, float16")
    parser.add_argument("--model", default=None,
                        help="local diffusers folder (default: a tiny random model with SD's downscale factor 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for --size cpu on the CPU, else torch's own)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--no-report", action="store_true", help="print the table only; write no record")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the records (default benchmarks/results)")
    parser.add_argument("--beside", default=None,
                        help="what else ran on the machine, kept in the records (default: the CPU use just before)")
    return parser


def finish_args(args: argparse.Namespace, build: Callable[[Path], Path] | None = None) -> argparse.Namespace:
    """Fill the defaults that depend on the device, and build the tiny model (`build`, default the
    tiny SD model) when none is given."""
    import psutil
    import torch

    from smd_cli.models.loading import resolve_device, resolve_dtype

    args.busy = psutil.cpu_percent(interval=0.5)  # other processes' load, before this one starts working
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    if args.size is None:
        args.size = "cpu" if args.device.type == "cpu" else "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device.type == "cpu" and args.size == "cpu":
        # Tiny models gain nothing from several threads, and OpenMP threads that wait for a core
        # another process holds make CPU timings swing a hundredfold; one thread keeps them steady.
        torch.set_num_threads(1)
    if args.model is None:
        args.model = str((build or tiny_model)(scratch_dir() / "tiny-model"))
    return args


# -----------------------------------------------------------------------------------------------
# Random models


def _config(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def model_family(folder: str | Path) -> str:
    """sd, sdxl, sd3 or flux, read from the model's configs."""
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        return "sd3" if "caption_projection_dim" in _config(folder, "transformer") else "flux"
    return "sdxl" if _config(folder, "unet").get("addition_embed_type") == "text_time" else "sd"


def model_summary(folder: str | Path) -> str:
    """The model's shape in a few words, read from its configs: which random model a row used."""
    folder, family = Path(folder), model_family(folder)
    factor = 2 ** (len(_config(folder, "vae")["block_out_channels"]) - 1)
    if family in ("sd3", "flux"):
        t = _config(folder, "transformer")
        blocks = t["num_layers"] + t.get("num_single_layers", 0)
        return (f"random {'SD3' if family == 'sd3' else 'FLUX.1'}-shaped transformer, {blocks} blocks of width "
                f"{t['num_attention_heads'] * t['attention_head_dim']}, VAE factor {factor}")
    unet, kind = _config(folder, "unet"), "SDXL-shaped " if family == "sdxl" else ""
    return (f"random {kind}UNet with channels {tuple(unet['block_out_channels'])} and cross-attention "
            f"{unet['cross_attention_dim']}, VAE factor {factor}")


def scratch_dir() -> Path:
    """A temporary folder for this process's models, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="smd-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def tests_on_path() -> None:
    """The tests' tiny model builders are reused, not copied: make `tinymodel` importable."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def tiny_model(folder: Path, *, factor: int = 8, seed: int = 2) -> Path:
    """The tests' tiny random SD model, with a VAE that downscales by `factor` (8 like SD's)."""
    tests_on_path()
    from tinymodel import build_tiny_pipeline

    return build_tiny_pipeline(folder, vae_blocks=int(math.log2(factor)) + 1, seed=seed)


def tiny_sdxl(folder: Path, *, factor: int = 8, seed: int = 2) -> Path:
    """The tests' tiny random SDXL model, with a VAE that downscales by `factor` (8 like SDXL's)."""
    tests_on_path()
    from tinymodel import build_tiny_sdxl

    return build_tiny_sdxl(folder, vae_blocks=int(math.log2(factor)) + 1, seed=seed)


def tiny_sd3(folder: Path, *, factor: int = 8, seed: int = 2) -> Path:
    """The tests' tiny random SD3 (with T5), with a VAE that downscales by `factor`."""
    tests_on_path()
    from tinymodel import build_tiny_sd3

    return build_tiny_sd3(folder, vae_blocks=int(math.log2(factor)) + 1, seed=seed, t5=True)


def tiny_flux(folder: Path, *, factor: int = 8, seed: int = 2) -> Path:
    """The tests' tiny random FLUX.1 (dev-like: guidance embedded), with a VAE that downscales by `factor`."""
    tests_on_path()
    from tinymodel import build_tiny_flux

    return build_tiny_flux(folder, vae_blocks=int(math.log2(factor)) + 1, seed=seed, guidance=True)


def tiny_taesd(folder: Path, *, factor: int = 8, seed: int = 0) -> Path:
    """The tests' tiny random AutoencoderTiny, downscaling by `factor`."""
    tests_on_path()
    from tinymodel import build_tiny_taesd

    return build_tiny_taesd(folder, blocks=int(math.log2(factor)) + 1, seed=seed)


def fresh_pipeline(pipe, vae=None):
    """A new smd pipeline over the same modules (with `vae` instead of its own, where given): empty
    prompt and white-latent caches, so that one run does not time another's cached text encodings."""
    from smd_cli import StableMultiDiffusionPipeline

    c = pipe.components
    return StableMultiDiffusionPipeline.from_components(
        unet=pipe.unet, vae=vae or pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
        force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt, device=pipe.device, dtype=pipe.dtype)


def shape_masks(count: int, height: int, width: int):
    """`count` of the SHAPES as [count, H, W] float masks, drawn by smd's own mask functions."""
    import numpy as np

    from smd_cli.method.masks import ellipse_mask, rect_mask

    draw = {"rect": rect_mask, "ellipse": ellipse_mask}
    return np.stack([draw[kind](box, height, width) for kind, box in SHAPES[:count]])


# -----------------------------------------------------------------------------------------------
# Measurements


def synchronize(device) -> None:
    """Wait for queued GPU work, so wall times cover it."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class UNetProbe:
    """Counts UNet forward calls and batch items; with `timed`, also the seconds spent inside.

    Timing synchronizes the GPU around every call, so it is only switched on where the share
    of time inside the UNet is what is measured.
    """

    def __init__(self, unet, *, timed: bool = False):
        self.unet, self.timed = unet, timed
        self.calls = self.items = 0
        self.seconds = 0.0
        self._started = 0.0
        self._handles: list = []

    def _before(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # a UNet's or a transformer's
        self.calls += 1
        self.items += int(sample.shape[0])
        if self.timed:
            synchronize(sample.device)
            self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self.timed:
            synchronize(self.unet.device)
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> UNetProbe:
        self._handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.unet.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak memory of a block above what was in use when it began (weights already loaded excluded).

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's RSS, sampled by psutil every 5 ms
    (ru_maxrss cannot be reset, so it would report the model load's peak instead of the run's).
    """

    INTERVAL = 0.005

    def __init__(self, device):
        self.device = device
        self.mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def method(device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated during the run minus memory allocated before it"
        return "peak RSS during the run (psutil, sampled every 5 ms) minus RSS before it"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            process = psutil.Process()
            self._start = self._peak = process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
            self._thread.start()
        return self

    def _sample(self, process) -> None:
        while not self._stop.wait(self.INTERVAL):
            self._peak = max(self._peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        self.mib = max(peak - self._start, 0) / 2**20


@dataclass
class Measurement:
    """What one benchmarked run cost."""

    seconds: float
    calls: int
    items: int
    peak_mib: float
    unet_seconds: float = 0.0


def measure(run: Callable[[], Any], unet, device, *, timed_unet: bool = False) -> Measurement:
    """Run once, counting UNet work, wall time and peak memory."""
    with UNetProbe(unet, timed=timed_unet) as probe, PeakMemory(device) as memory:
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds = time.perf_counter() - started
    return Measurement(seconds, probe.calls, probe.items, memory.mib, probe.seconds)


def warm_up(unet, latent_size: tuple[int, int], batch: int = 2) -> None:
    """One UNet call at the measured latent size, so that one-time costs (CUDA context, kernel
    choice, allocator growth) are paid before any timed run rather than by whichever goes first."""
    import torch

    config = unet.config
    x = torch.zeros(batch, config.in_channels, *latent_size, device=unet.device, dtype=unet.dtype)
    states = torch.zeros(batch, 77, config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    cond = added = None
    if config.get("time_cond_proj_dim") is not None:
        cond = torch.zeros(batch, config.time_cond_proj_dim, device=unet.device, dtype=unet.dtype)
    if config.get("addition_embed_type") == "text_time":  # SDXL: the pooled text and six size numbers
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, pooled, device=unet.device, dtype=unet.dtype),
                 "time_ids": torch.zeros(batch, 6, device=unet.device, dtype=unet.dtype)}
    with torch.no_grad():
        unet(x, 999, encoder_hidden_states=states, timestep_cond=cond, added_cond_kwargs=added)
    synchronize(unet.device)


def wall_times(run: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times of `repeats` runs, sorted (for `spread`)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers' deprecation notes and numpy's casts of random-weight NaNs while timing."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -----------------------------------------------------------------------------------------------
# Rows


def comparison_rows(smd: tuple[str, Measurement], baseline: tuple[str, Measurement]) -> list[dict]:
    """One row per run and a `baseline / smd` row of ratios."""
    rows = [_cost_row(name, m) for name, m in (smd, baseline)]
    s, b = smd[1], baseline[1]
    rows.append({"run": "**baseline / smd**", "UNet calls": _ratio(b.calls, s.calls),
                 "UNet batch items": _ratio(b.items, s.items), "wall s": _ratio(b.seconds, s.seconds),
                 "peak MiB": _ratio(b.peak_mib, s.peak_mib)})
    return rows


def comparison_notes(device) -> list[str]:
    """The notes every smd-against-baseline table carries: what its columns count."""
    return ["UNet batch items count each latent in a call once (guidance's unconditional half included)",
            f"peak MiB: {PeakMemory.method(device)}"]


def _cost_row(name: str, m: Measurement) -> dict:
    return {"run": name, "UNet calls": m.calls, "UNet batch items": m.items, "wall s": f"{m.seconds:.2f}",
            "peak MiB": f"{m.peak_mib:.0f}"}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "n/a"


def spread(times: Sequence[float]) -> dict:
    """Median, min and max of sorted wall times, as row cells."""
    return {"runs": len(times), "median s": f"{statistics.median(times):.3f}", "min s": f"{times[0]:.3f}",
            "max s": f"{times[-1]:.3f}"}


# -----------------------------------------------------------------------------------------------
# Machine facts and the records


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name, or the CPU's in a few words with its cores ("2-core Intel Xeon")."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    name = re.split(r"\s+(?:Processor\b|CPU\b|@)", re.sub(r"\((?:R|TM)\)", "", cpu_model()))[0]
    return f"{os.cpu_count()}-core {' '.join(name.split())}"


def commit() -> str | None:
    """The checked-out commit, `-dirty` when tracked files differ from it; None outside a clone."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "describe", "--always", "--dirty", "--exclude=*"],
                              cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine(device) -> dict:
    """Where and with what the numbers were measured."""
    import diffusers
    import torch

    import smd_cli

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "device_type": device.type,
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
        "smd": smd_cli.__version__,
        "commit": commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows as a markdown table; columns are the keys in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def typed(cell):
    """A table cell as JSON keeps it: numbers as numbers, the rest ("44.4x", "13%") as printed."""
    if isinstance(cell, str) and re.fullmatch(r"-?\d+(\.\d+)?", cell):
        return float(cell) if "." in cell else int(cell)
    return cell


def record(args, benchmark: str, title: str, rows: Sequence[dict], notes: Sequence[str] = (), **setting) -> str:
    """Print a titled table and, unless --no-report, append it as a record to its device's file in --results;
    `setting` says what was measured (canvas, tile, ...) beside the size, model and dtype of `args`."""
    from smd_cli.core.defaults import TILE_STRIDE

    facts = machine(args.device)
    header = (f"_{facts['date']} · smd {facts['smd']} ({facts['commit']}) · device: {facts['device']} · "
              f"{facts['machine']} · torch {facts['torch']} ({facts['threads']} threads), diffusers "
              f"{facts['diffusers']}, Python {facts['python']}_")
    section = f"## {title}\n\n{header}\n\n{markdown_table(rows)}\n" + "".join(f"\n- {note}" for note in notes)
    print(section, flush=True)
    if args.no_report:
        return section
    model = {"family": model_family(args.model), "model": model_summary(args.model)} if args.model else {}
    if "tile" in setting:
        setting["stride"] = "{}/{}".format(*TILE_STRIDE)  # smd's default stride between views, of the tile
    setting = {"size": args.size, **model, **setting, "dtype": str(args.dtype).removeprefix("torch.")}
    entry = {**facts, "benchmark": benchmark, "title": title,
             "setting": {key: value for key, value in setting.items() if value is not None},
             "rows": [{key: typed(cell) for key, cell in row.items()} for row in rows], "notes": list(notes),
             "beside": args.beside or f"not said; other processes used {args.busy:.0f}% of the CPUs just before",
             "note": None}
    path = Path(args.results) / (re.sub(r"[^a-z0-9]+", "-", facts["device"].lower()).strip("-") + ".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return section
