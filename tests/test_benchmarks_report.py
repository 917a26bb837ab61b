"""benchmarks/report.py: the newest record per setting in the machines' tables, all in the history, and
BENCHMARKS.md exactly what it writes from benchmarks/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402 - after the path it needs


def panorama(date: str, ratio: str, device: str, smd: str = "0.3.0") -> dict:
    """A panorama record as the benchmark writes one, with `ratio` as its wall-time ratio."""
    rows = [{"run": "smd", "UNet calls": 5, "UNet batch items": 40, "wall s": 0.1, "peak MiB": 1},
            {"run": "MultiDiffusion", "UNet calls": 300, "UNet batch items": 4100, "wall s": 5.0, "peak MiB": 1},
            {"run": "**baseline / smd**", "UNet calls": "60.0x", "UNet batch items": "102.5x", "wall s": ratio,
             "peak MiB": "1.0x"}]
    return {"date": date, "device": device, "device_type": "cuda" if "GPU" in device else "cpu", "machine": "test",
            "smd": smd, "commit": "abc1234", "torch": "2.13.0", "threads": 1, "diffusers": "0.42.1", "python": "3.11",
            "benchmark": "panorama", "title": "Panorama (cpu)", "notes": [], "beside": None, "note": None,
            "setting": {"size": "cpu", "family": "sd", "canvas": "384x64", "tile": 64, "stride": "3/4"}, "rows": rows}


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_tables_keep_the_newest_record_of_each_setting_and_the_history_every_one(tmp_path):
    write(tmp_path / "cpu.jsonl", [panorama("2026-01-01 10:00 UTC", "11.1x", "2-core Test CPU"),
                                   panorama("2026-02-01 10:00 UTC", "22.2x", "2-core Test CPU")])
    write(tmp_path / "gpu.jsonl", [panorama("2026-01-15 10:00 UTC", "33.3x", "Test GPU"),
                                   panorama("2026-01-02 10:00 UTC", "44.4x", "8-core Old CPU", smd="0.1.0")])
    current, history = report.render(tmp_path).split("\n## History\n")
    assert "22.2x" in current and "33.3x" in current
    assert "11.1x" not in current and "44.4x" not in current  # superseded, and a CPU with only an older smd
    assert "8-core Old CPU" not in current
    assert all(ratio in history for ratio in ("11.1x", "22.2x", "33.3x", "44.4x"))


def test_benchmarks_md_is_what_the_generator_writes():
    assert (REPO / "BENCHMARKS.md").read_text(encoding="utf-8") == report.render(), \
        "BENCHMARKS.md differs from the records: run python -m benchmarks.report"
