"""Write BENCHMARKS.md from the records in benchmarks/results/ (`python -m benchmarks.report`).

Per machine, the newest record of each benchmark and setting; the goals; the goals' figures over time.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO, RESULTS, markdown_table

ORDER = ("panorama", "regional", "reference", "stream", "region_modes", "paint", "startup", "controls",
         "fast_paths.regional", "fast_paths.stream", "views", "decode", "vae_tiles")
LABELS = {"panorama": "panorama vs MultiDiffusion", "regional": "regional vs the naive loop",
          "reference": "reference implementation", "stream": "stream", "region_modes": "attention vs latent mode",
          "paint": "smd paint",
          "startup": "start-up", "controls": "region controls", "fast_paths.regional": "fast paths, regional scene",
          "fast_paths.stream": "fast paths, stream", "views": "view layouts", "decode": "decoding layouts",
          "vae_tiles": "large pictures (tiled VAE)"}
FAMILIES = {"sd": "", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1", "all": "every family"}

HEADER = """# Benchmarks

Written by `python -m benchmarks.report` from the records in `benchmarks/results/`: edit those,
not this file. Dates are UTC; "smd" is the version measured and "commit" the commit it ran at (for
records from before the results were kept as files, the commit that published them).

**How to read.** Every run uses random weights. On a CPU the models are the tests' tiny ones and
most canvases an eighth of the published size (the setting gives each canvas), so the figures show
how the work compares between samplers: compare ratios, not seconds, and not across machines. On a
GPU the weights have the real models' shapes (SD 1.5 unless the setting names another family), in
float16, at full size. Each machine's table keeps the newest record of each benchmark and setting;
older records are in the history. "views" is smd's view size and the stride between views, as a
fraction of a view.

**How to reproduce.** `make bench` runs `benchmarks/run_all.py` on the CPU (a few minutes), then
this generator; on a GPU, `python -m benchmarks.gpu`, then `python -m benchmarks.report`. The
reference implementation's comparison runs alone (`benchmarks/README.md`).

## Goals

The newest figure of each goal on each machine below. A CPU runs the tests' tiny models, mostly at
an eighth of the goal's canvas: the setting says which.
"""
HISTORY = """
## History

Every measurement, with its table, the notes on how it was made, what else ran (`beside`) and what
was concluded at the time (`note`), is a record in one JSON Lines file per machine (the format:
`benchmarks/README.md`):

{files}

Before they were kept as files, this page was a log the scripts appended to: its last text is
`git show 0171ba0:BENCHMARKS.md`. The goals' figures over time, superseded ones included:
"""


class Cells(dict):
    """A row for str.format_map: a column it lacks reads "?"."""

    def __missing__(self, key: str) -> str:
        return "?"


def each(template: str, keep: Callable[[dict], bool] = lambda row: True) -> Callable[[list[dict]], str]:
    """A summary: `template` filled from every kept row, joined by semicolons."""
    return lambda rows: "; ".join(template.format_map(Cells(row)) for row in rows if keep(row))


def row(label: str, template: str) -> Callable[[list[dict]], str]:
    """A value: `template` filled from the row whose first cell starts with `label`."""
    return lambda rows: next(template.format_map(Cells(r)) for r in rows
                             if str(next(iter(r.values()))).startswith(label))


def wall(rows: list[dict]) -> str:
    smd, baseline, ratio = rows[:3]
    return f"{ratio['wall s']} less wall time ({smd['wall s']} s against {baseline['wall s']} s)"


def comparison(rows: list[dict]) -> str:
    ratio = rows[2]
    return f"{wall(rows)}, {ratio['UNet batch items']} fewer UNet batch items, {ratio['UNet calls']} fewer calls"


def paint(rows: list[dict]) -> str:
    stroke, between, frame = rows[:3]
    return (f"{stroke['median']} ms (median; {stroke['min']} to {stroke['max']}), {between['median']} frame in "
            f"between, a frame every {frame['median']} ms")


def decode(rows: list[dict]) -> str:
    return "channels-last against contiguous: " + "; ".join(
        f"{re.sub(r' [(].*[)]', '', r['autoencoder'])} {r['contiguous / channels-last']}" for r in rows)


AGAINST_REFERENCE = "{reference / smd} less wall time ({smd s} s against {reference s} s)"


def plain(rows: list[dict]) -> str:
    return "; ".join(", ".join(str(cell) for cell in r.values()) for r in rows)


SUMMARIES = {
    "panorama": comparison, "regional": comparison,
    "reference": each("{run}: " + AGAINST_REFERENCE),
    "stream": each("{layers}: {frames/s} frames/s, {outside UNet} outside the UNet"),
    "region_modes": each("{what}: {speed-up} ({latent} latent, {attention} attention)"),
    "paint": paint,
    "startup": each("{what}: {median s} s"),
    "controls": each("{controls}: {wall s (median)} s ({vs none})"),
    "fast_paths.regional": each("{option}: {speed-up} (pixels off the default's by {pixel difference (mean / max of "
                                "255)} of 255, mean / max)", lambda r: r["option"] != "default"),
    "fast_paths.stream": each("{stream, 3 layers}: {frames/s} frames/s, {outside UNet} outside the UNet"),
    "views": each("fastest for {family}: tile / stride {tile / stride px} px, {wall s} s",
                  lambda r: r.get("") == "fastest"),
    "decode": decode,
    "vae_tiles": each("{autoencoder} {canvas}: peak {one pass peak MiB} MiB one pass, {tiled peak MiB} tiled, "
                      "{tiled / one pass time} the time"),
}


@dataclass(frozen=True)
class Goal:
    """A goal: its target, the benchmark and settings that measure it, and its value from a record's rows."""

    name: str
    target: str
    benchmark: str
    settings: tuple[dict, ...]  # the settings that measure it, the preferred first
    value: Callable[[list[dict]], str]


REFERENCE = ({"size": "full"}, {"size": "cpu"})
STREAM = ({"canvas": "512x512"}, {"canvas": "256x256"})
GOALS = (
    Goal("panorama 512 x 3072 vs diffusers' MultiDiffusion", "at least 30x less wall time", "panorama",
         ({"canvas": "3072x512"}, {"canvas": "384x64"}), wall),
    Goal("panorama 1024 x 512 vs diffusers' MultiDiffusion", "none set", "panorama", ({"canvas": "1024x512"},), wall),
    Goal("regional, 9 prompts at 1920 x 768, vs the naive MultiDiffusion loop", "at least 50x less wall time",
         "regional", ({"canvas": "1920x768"}, {"canvas": "240x96"}), wall),
    Goal("panorama 512 x 3072 vs the reference's sample_panorama", "at least 2x (issue 16)", "reference", REFERENCE,
         row("panorama", AGAINST_REFERENCE)),
    Goal("regional, 9 prompts at 1920 x 768, vs the reference", "at least 3.5x (issue 16)", "reference", REFERENCE,
         row("regional", AGAINST_REFERENCE)),
    Goal("stream 512 x 512, 3 layers, tiny VAE", "40 frames/s on an H100-class GPU", "stream", STREAM,
         row("3 +", "{frames/s} frames/s")),
    Goal("share of a stream call outside the UNet, 3 layers", "under 10% on a GPU", "stream", STREAM,
         row("3 +", "{outside UNet}")),
    Goal("`smd --help`", "under 0.3 s", "startup", ({},), row("smd --help", "{median s} s (median of {runs})")),
    Goal("smd paint: a stroke to the first frame made with it", "none set", "paint", ({},), paint),
)


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load(folder: Path) -> list[dict]:
    """Every record in the folder's JSON Lines files, oldest first (a file's order breaks ties)."""
    records = [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in lines(path)]
    return sorted(records, key=lambda r: r["date"])


def version(record: dict) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", record["smd"]))


def current_devices(records: list[dict]) -> list[str]:
    """The machines with a record of the newest smd measured on their kind of device (CPU or GPU)."""
    newest = {}
    for r in records:
        newest[r["device_type"]] = max(newest.get(r["device_type"], ()), version(r))
    ordered = sorted(records, key=lambda r: (r["device_type"], r["device"]))
    return list(dict.fromkeys(r["device"] for r in ordered if version(r) == newest[r["device_type"]]))


def place(record: dict) -> tuple:
    """Where a record's row goes in a machine's table: by benchmark, family, then canvas."""
    benchmarks, families = list(ORDER), list(FAMILIES)
    benchmark, family = record["benchmark"], record["setting"].get("family")
    return (benchmarks.index(benchmark) if benchmark in benchmarks else len(benchmarks),
            families.index(family) if family in families else len(families), record["setting"].get("canvas", ""))


def newest(records: list[dict]) -> list[dict]:
    """The newest record of each benchmark, family, canvas and autoencoder set, in the table's order
    (a record of both autoencoders replaces older ones of either)."""
    latest = {}
    for r in records:
        key = (r["benchmark"], *(r["setting"].get(k) for k in ("family", "canvas")))
        if r["setting"].get("autoencoders") == "both":
            for part in ("model", "shaped"):
                latest.pop((*key, part), None)
        latest[(*key, r["setting"].get("autoencoders"))] = r
    return sorted(latest.values(), key=place)


def describe(record: dict) -> str:
    """The setting in a few words: canvas, family, smd's views, threads where a CPU ran several."""
    s = record["setting"]
    parts = [s.get("canvas", ""), FAMILIES.get(s.get("family"), s.get("family", ""))]
    if "tile" in s:
        parts.append(f"views {s['tile']} px, stride {s['stride']}")
    if "vae_tile" in s:
        parts.append(f"VAE tiles {s['vae_tile']} px")
    if record["device_type"] == "cpu" and record["threads"] != 1:
        parts.append(f"{record['threads']} threads")
    return ", ".join(part for part in parts if part)


def measured(record: dict) -> str:
    return f"{record['date'].removesuffix(' UTC')} · smd {record['smd']} · {record['commit'] or '?'}"


def matches(record: dict, goal: Goal, setting: dict) -> bool:
    return record["benchmark"] == goal.benchmark and all(record["setting"].get(k) == v for k, v in setting.items())


def preferred(goal: Goal, records: list[dict]) -> list[dict]:
    """The records of the first of the goal's settings that `records` measure."""
    return next((found for setting in goal.settings if (found := [r for r in records if matches(r, goal, setting)])),
                [])


def goal_rows(records: list[dict], devices: list[str] | None = None) -> list[dict]:
    """Per goal, each of `devices`' newest record of the goal's preferred setting; without `devices`,
    every record of the goal's settings (the history)."""
    rows = []
    for goal in GOALS:
        if devices is None:
            found = [r for r in records if any(matches(r, goal, setting) for setting in goal.settings)]
        else:
            found = [hits[-1] for device in devices
                     if (hits := preferred(goal, [r for r in records if r["device"] == device]))]
        for i, r in enumerate(found):
            target = {} if devices is None else {"target": "" if i else goal.target}
            rows.append({"goal": "" if i else goal.name, **target, "device": r["device"], "setting": describe(r),
                         "value": goal.value(r["rows"]), "measured": measured(r)})
    return rows


def torches(records: list[dict]) -> str:
    """The torch most records ran, then any other with the benchmarks that ran it."""
    usual = Counter(r["torch"] for r in records).most_common(1)[0][0]
    odd = [f"{r['torch']} for the {LABELS.get(r['benchmark'], r['benchmark'])}" for r in records if r["torch"] != usual]
    return ", ".join(dict.fromkeys([usual, *odd]))


def machine_section(device: str, records: list[dict]) -> list[str]:
    """A machine's heading, its facts and the newest record of each benchmark and setting it ran."""
    mine = newest([r for r in records if r["device"] == device])
    last = max(mine, key=lambda r: r["date"])
    facts = (f"{last['machine']}; torch {torches(mine)}, diffusers {last['diffusers']}, Python {last['python']}. "
             f"Newest record {measured(last)}.\n")
    return [f"\n## {device}\n", facts,
            markdown_table([{"benchmark": LABELS.get(r["benchmark"], r["benchmark"]), "setting": describe(r),
                             "result": SUMMARIES.get(r["benchmark"], plain)(r["rows"]), "measured": measured(r)}
                            for r in mine])]


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def render(folder: Path = RESULTS) -> str:
    """BENCHMARKS.md's text from the records in `folder`."""
    records = load(folder)
    devices = current_devices(records)
    files = [f"- `{shown(path)}`: {len(lines(path))} records" for path in sorted(folder.glob("*.jsonl"))]
    return "\n".join([HEADER, markdown_table(goal_rows(records, devices)),
                      *(line for device in devices for line in machine_section(device, records)),
                      HISTORY.format(files="\n".join(files)), markdown_table(goal_rows(records))]) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the records (benchmarks/results)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="the file written (BENCHMARKS.md)")
    args = parser.parse_args(argv)
    args.output.write_text(render(args.results), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
