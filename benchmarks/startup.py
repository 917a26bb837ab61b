"""Startup: how long `smd --help` and `smd validate` take, and loading a model from a local folder.

The CLI keeps torch and diffusers out of both commands (STYLE: heavy imports only where a model
runs), so they should take a fraction of a second; model loading is timed in-process after one
untimed load, so that it measures reading the folder rather than importing diffusers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import (
    REPO,
    base_parser,
    finish_args,
    model_summary,
    quiet,
    record,
    scratch_dir,
    spread,
    synchronize,
    wall_times,
)

CLI_RUNS = 5
LOAD_RUNS = 3
LAYERS = 1000


def many_layers(path: Path, count: int) -> Path:
    """A 512 x 512 scene of `count` small rectangles, each its own layer."""
    rects = "".join(f"  - {{prompt: layer {i}, mask: {{rect: [{16 * (i % 32)}, {16 * (i // 32 % 32)}, "
                    f"{16 * (i % 32) + 16}, {16 * (i // 32 % 32) + 16}]}}}}\n" for i in range(count))
    path.write_text(f"width: 512\nheight: 512\nlayers:\n{rects}")
    return path


def smd_command() -> list[str]:
    """The installed `smd` script beside this Python, else the module."""
    script = Path(sys.executable).with_name("smd")
    if script.is_file():
        return [str(script)]
    found = shutil.which("smd")
    return [found] if found else [sys.executable, "-m", "smd_cli"]


def time_command(args: list[str]) -> list[float]:
    """Wall times of a command run CLI_RUNS times from the repository root (it must succeed)."""
    return wall_times(lambda: subprocess.run(args, cwd=REPO, check=True, capture_output=True), CLI_RUNS)


def time_loads(args) -> list[float]:
    """LOAD_RUNS loads onto the device, after one untimed load that pays for imports and caches."""
    from smd_cli import StableMultiDiffusionPipeline

    def load():
        StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
        synchronize(args.device)

    load()
    return wall_times(load, LOAD_RUNS)


def main(argv=None) -> str:
    args = finish_args(base_parser(__doc__.splitlines()[0]).parse_args(argv))
    smd = smd_command()
    scenes = sorted(str(p.relative_to(REPO)) for p in (REPO / "scenes").glob("*.yaml"))
    many = many_layers(scratch_dir() / "layers.yaml", LAYERS)
    rows = [{"what": "smd --help", **spread(time_command(smd + ["--help"]))},
            {"what": f"smd validate scenes/*.yaml ({len(scenes)} scenes)",
             **spread(time_command(smd + ["validate", *scenes]))},
            {"what": f"smd validate of {LAYERS} layers (512x512, rectangles)",
             **spread(time_command(smd + ["validate", str(many)]))}]
    with quiet():
        rows.append({"what": f"model load from a local folder onto {args.device}", **spread(time_loads(args))})
    command = " ".join(os.path.relpath(part, REPO) if Path(part).is_absolute() else part for part in smd)
    notes = [f"commands run as subprocesses from the repository root: `{command} ...`",
             f"model: {model_summary(args.model)}, {args.dtype}, "
             f"`StableMultiDiffusionPipeline({str(args.device)!r}, hf_key=folder)`"]
    return record(args, "startup", "Startup: CLI and model loading", rows, notes)


if __name__ == "__main__":
    main()
