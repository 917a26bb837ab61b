"""Region controls: what per-layer LoRAs, ControlNets, reference images and weighted prompts cost.

The regional scene's 8 layers over a background (`benchmarks.regional`'s layout, as shapes), LCM 5
steps, bootstrapping 2, on one model: with nothing, with one LoRA over the whole canvas, with its
own LoRA on 1, 2 and 4 layers, and the same with a ControlNet (over the canvas, on 1 and 4
layers), and a reference image through an IP-Adapter (over the canvas, on 1 layer). Rows of
different LoRA sets or IP-Adapter scales go to the denoiser in separate calls (`smd_cli.models.loras`), so
the call count grows with the sets; a ControlNet runs on the rows it acts on and leaves the UNet
call whole (`smd_cli.models.controls`). Each run is timed `--repeats` times, interleaved, and the median
reported. Prompt encoding is timed apart: plain prompts, the
same with `(word:1.3)` weights (compel's path), and prompts of 120 words (in chunks).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from PIL import Image

from benchmarks.common import (
    UNetProbe,
    base_parser,
    finish_args,
    fresh_pipeline,
    model_summary,
    quiet,
    record,
    scratch_dir,
    shape_masks,
    synchronize,
    tests_on_path,
)
from benchmarks.regional import BACKGROUND, PROMPTS, SIZES

RUNS = {"none": ("lora", 0), "one LoRA over the canvas": ("lora", -1), "1 layer with its own LoRA": ("lora", 1),
        "2 layers with their own LoRAs": ("lora", 2), "4 layers with their own LoRAs": ("lora", 4),
        "one ControlNet over the canvas": ("controlnet", -1), "1 layer with its own ControlNet": ("controlnet", 1),
        "4 layers with their own ControlNet": ("controlnet", 4),
        "one reference image over the canvas": ("reference", -1), "1 layer with its own reference": ("reference", 1)}
WORDS = ["red", "blue", "tall", "small", "green", "old", "new", "wide"]


def controlnet_folder(model: str) -> str:
    """A random ControlNet made from the model's UNet, as the tests make one."""
    tests_on_path()
    from tinymodel import write_tiny_controlnet

    return str(write_tiny_controlnet(model, scratch_dir() / "controlnet"))


def ip_adapter_file(model: str) -> str:
    """A random IP-Adapter for the model's UNet, with a small random image encoder, as the tests make one."""
    tests_on_path()
    from tinymodel import write_tiny_ip_adapter

    return str(write_tiny_ip_adapter(model, scratch_dir() / "ip-adapter"))


def lora_files(model: str, count: int) -> list[str]:
    """`count` random LoRAs for the model's UNet attention, made with peft as the tests make them."""
    tests_on_path()
    from tinymodel import write_tiny_lora

    folder = scratch_dir()
    return [str(write_tiny_lora(model, folder / f"lora{i}", seed=i)) for i in range(count)]


def main(argv=None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (median reported)")
    args = finish_args(parser.parse_args(argv))
    import torch

    from smd_cli import StableMultiDiffusionPipeline

    size = SIZES[args.size]
    loras = lora_files(args.model, 4)
    image = Image.fromarray((np.random.default_rng(0).random((size.height, size.width, 3)) * 255).astype(np.uint8))
    control = {"model": controlnet_folder(args.model), "image": image}
    reference = {"image": image, "adapter": ip_adapter_file(args.model)}
    masks = shape_masks(len(PROMPTS), size.height, size.width)
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    # A loaded IP-Adapter stays in the UNet (at scale 0 where no reference acts): its runs get a pipeline of their own.
    referring = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")

    def run(setting: tuple[str, int]):
        kind, count = setting
        mine = {"lora": lambda i: [loras[i]], "controlnet": lambda i: [control], "reference": lambda i: reference}
        own = [mine[kind](i) if i < count else ([] if kind != "reference" else None) for i in range(len(PROMPTS))]
        extra = {"lora": dict(loras=loras[0] if count < 0 else None, layer_loras=own),
                 "controlnet": dict(controlnets=control if count < 0 else None, layer_controlnets=own),
                 "reference": dict(reference=reference if count < 0 else None, layer_references=own)}[kind]
        chosen = referring if kind == "reference" else pipe
        return chosen(PROMPTS, masks=masks, background_prompt=BACKGROUND, height=size.height, width=size.width,
                      tile_size=size.tile_size, bootstrap_steps=2, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(args.seed), **extra)

    with quiet():
        for setting in RUNS.values():  # untimed: loads each LoRA, and pays each shape's first run
            run(setting)
        times = {name: [] for name in RUNS}
        calls = {}
        for _ in range(args.repeats):
            for name, setting in RUNS.items():
                with UNetProbe((referring if setting[0] == "reference" else pipe).unet) as probe:
                    synchronize(args.device)
                    started = time.perf_counter()
                    run(setting)
                    synchronize(args.device)
                    times[name].append(time.perf_counter() - started)
                calls[name] = (probe.calls, probe.items)
    base = statistics.median(times["none"])
    rows = [{"controls": name, "UNet calls": calls[name][0], "UNet batch items": calls[name][1],
             "wall s (median)": f"{statistics.median(t):.3f}", "vs none": f"{statistics.median(t) / base:.2f}x"}
            for name, t in times.items()]

    plain = [f"a {w} house by the sea" for w in WORDS]
    weighted = [f"a ({w}:1.3) house by the [sea]" for w in WORDS]
    long = [", ".join(f"a {w} house by the sea" for w in WORDS * 3) + f", {i}" for i in range(len(WORDS))]
    encode_rows = []
    for name, texts in (("8 plain prompts", plain), ("8 weighted prompts", weighted), ("8 prompts of 120 words", long)):
        spent = []
        for _ in range(args.repeats + 1):
            fresh = fresh_pipeline(pipe)  # nothing remembered
            started = time.perf_counter()
            states = fresh.encode_prompts(texts).states
            synchronize(args.device)
            spent.append(time.perf_counter() - started)
        encode_rows.append({"controls": f"encoding {name}", "UNet calls": "-", "UNet batch items": "-",
                            "wall s (median)": f"{statistics.median(spent[1:]):.3f}",
                            "vs none": f"{states.shape[1]} tokens"})
    notes = [f"{size.width}x{size.height} canvas, tile {size.tile_size} px, "
             "8 layers + background (shapes), LCM 5 steps, "
             f"bootstrap 2, seed {args.seed}, {args.dtype}, {model_summary(args.model)}; random LoRAs of rank 4 "
             "on the UNet's attention; a random ControlNet made from the UNet (`ControlNetModel.from_unet`) with a "
             "noise control image; a random IP-Adapter with a small random image encoder",
             f"median of {args.repeats} interleaved runs after one untimed run of each; encoding rows: a fresh "
             "pipeline each time (no remembered prompts), median of the runs after the first; the last column "
             "of an encoding row is the token length of its conditioning"]
    return record(args, "controls", f"Region controls ({args.size}): per-layer LoRAs, ControlNets, references, "
                  "weighted prompts", rows + encode_rows, notes, canvas=f"{size.width}x{size.height}",
                  tile=size.tile_size)


if __name__ == "__main__":
    main()
