"""Run every benchmark but the reference implementation's, one after another (`make bench`).

Options other than `--model`, `--vae` and `--compile` go to every benchmark, e.g. `--device cuda
--size full` or `--beside "nothing else running"`. Without `--model`/`--vae`, one tiny random model
and one tiny autoencoder are built and shared, and the view sweep and the SDXL, SD3 and FLUX.1
benchmark run on each family's tiny random model; `--model` (an SD 1.x folder) leaves those out
(`benchmarks.gpu` runs them on family-shaped weights). `--compile` adds torch.compile to the fast
paths (minutes of compiling on a CPU). Each benchmark appends its records to benchmarks/results/;
`python -m benchmarks.report` writes BENCHMARKS.md from them.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import (
    controls,
    decode,
    families,
    fast_paths,
    paint,
    panorama,
    region_modes,
    regional,
    startup,
    stream,
    views,
)
from benchmarks.common import scratch_dir, tiny_model, tiny_taesd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local diffusers folder (default: a tiny random model)")
    parser.add_argument("--vae", default=None,
                        help="AutoencoderTiny folder for the stream (default: a tiny random one)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile in the fast paths")
    args, shared = parser.parse_known_args(argv)
    started = time.perf_counter()
    scratch = scratch_dir()
    model = args.model or str(tiny_model(scratch / "tiny-sd"))
    vae = args.vae or str(tiny_taesd(scratch / "taesd"))
    options = shared
    shared = ["--model", model, *options]
    panorama.main(shared)
    regional.main(shared)
    controls.main(shared + ["--repeats", "2"])
    stream.main(shared + ["--vae", vae])
    region_modes.main(shared + ["--vae", vae])
    startup.main(shared)
    fast_paths.main(shared + (["--compile"] if args.compile else []))
    paint.main(shared + ["--vae", vae])
    decode.main(shared)
    if args.model is None:
        views.main(options)
        for family in families.BUILDERS:
            families.main(options + ["--vae", vae, "--family", family])
    print(f"all benchmarks: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
