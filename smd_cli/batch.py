"""Batches: which images a command makes (scenes x seeds), how they are shared among processes,
and how the run is summed up. No I/O beyond what the caller hands in; no torch at import.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from smd_cli.errors import SmdError

if TYPE_CHECKING:
    from smd_cli.masks import SceneMasks
    from smd_cli.scene import SceneFile

MAX_SEEDS = 100_000
SEED_LIMIT = 2**63

# Job statuses: done, failed (during generation), invalid (never started: the scene or its files
# are wrong), interrupted (Ctrl-C during it), skipped (not reached before Ctrl-C).
DONE, FAILED, INVALID, INTERRUPTED, SKIPPED = "done", "failed", "invalid", "interrupted", "skipped"


def parse_seeds(text: str) -> list[int]:
    """`1,2,3`, `10-20` (inclusive) or a mix like `1,5-7`; duplicates are dropped, order kept."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise SmdError(f"--seeds expects numbers and ranges like 1,2,3 or 10-20, got {part!r} in {text!r}")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise SmdError(f"--seeds range {part} runs backwards; write {last}-{first}")
        if last >= SEED_LIMIT:
            raise SmdError(f"--seeds {last} is too large; seeds are below 2**63")
        if last - first + 1 + len(seeds) > MAX_SEEDS:
            raise SmdError(f"--seeds {text!r} asks for more than {MAX_SEEDS} images")
        seeds.extend(range(first, last + 1))
    return list(dict.fromkeys(seeds))


def random_seed() -> int:
    return random.SystemRandom().randrange(2**32)


@dataclass
class Job:
    """One image to make: a scene with its seed filled in, its prepared masks, where it goes."""

    index: int
    scene: SceneFile
    seed: int
    template: str
    masks: Optional[SceneMasks] = None
    random_seed: bool = False  # the seed was drawn, not given

    def outcome(self, status: str, **details) -> Outcome:
        """What became of this job."""
        return Outcome(scene=self.scene.name, file=str(self.scene.path) if self.scene.path else None,
                       seed=self.seed, index=self.index, status=status, **details)


@dataclass
class Outcome:
    """What became of one job (or of a scene that never made it to a job)."""

    scene: str
    file: Optional[str]
    seed: Optional[int]
    status: str
    path: Optional[str] = None
    seconds: float = 0.0
    error: Optional[str] = None
    index: Optional[int] = None

    def as_json(self) -> dict[str, Any]:
        out = {"scene": self.scene, "file": self.file, "seed": self.seed, "path": self.path,
               "seconds": round(self.seconds, 3), "status": self.status}
        if self.error is not None:
            out["error"] = self.error
        return out


def seeds_for(sf: SceneFile, seeds: list[int] | None, repeat: int | None) -> list[tuple[int, bool]]:
    """(seed, drawn) for each image of a scene: --seeds, else --repeat random ones, else the scene's."""
    if seeds:
        return [(s, False) for s in seeds]
    if repeat:
        return [(random_seed(), True) for _ in range(repeat)]
    if sf.scene.seed is not None:
        return [(sf.scene.seed, False)]
    return [(random_seed(), True)]


def with_seed(sf: SceneFile, seed: int) -> SceneFile:
    """The same scene file with its seed set."""
    return dataclasses.replace(sf, scene=sf.scene.model_copy(update={"seed": seed}))


@dataclass
class Shard:
    """This process's place among the processes sharing a batch."""

    rank: int = 0
    size: int = 1
    state: Any = None  # accelerate's PartialState when distributed

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, jobs: list[Job]) -> list[Job]:
        """Jobs rank, rank + size, ...: an even share, whatever the jobs' costs' order."""
        return jobs[self.rank :: self.size]

    def least(self, value: int | None) -> int | None:
        """The smallest of every process's `value` (None where unknown)."""
        if self.size == 1 or self.state is None:
            return value
        from accelerate.utils import gather_object

        known = [v for v in gather_object([value]) if v is not None]
        return min(known) if known else None

    def gather(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Every process's outcomes, in job order, on every process."""
        if self.size == 1 or self.state is None:
            return outcomes
        from accelerate.utils import gather_object

        rows = gather_object([dataclasses.asdict(o) for o in outcomes])
        merged = [Outcome(**row) for row in rows]
        return sorted(merged, key=lambda o: (o.index is None, o.index if o.index is not None else 0))


def launched_distributed() -> bool:
    """True inside `accelerate launch` (or torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join_processes(cpu: bool) -> Shard:
    """Join the process group the launcher set up; each process learns its rank."""
    try:
        from accelerate import PartialState
    except ImportError:
        raise SmdError("distributed runs need Hugging Face Accelerate: pip install accelerate") from None
    state = PartialState(cpu=cpu)
    return Shard(rank=state.process_index, size=state.num_processes, state=state)


def exit_code(outcomes: list[Outcome]) -> int:
    """0 if every image was made, 2 if none could start (bad input everywhere), else 1."""
    if outcomes and all(o.status == DONE for o in outcomes):
        return 0
    if all(o.status == INVALID for o in outcomes):
        return 2
    return 1


def tally(outcomes: list[Outcome]) -> str:
    """Counts by status, for the last line of a summary: `2 done, 1 failed`."""
    order = (DONE, FAILED, INVALID, INTERRUPTED, SKIPPED)
    counts = {status: sum(o.status == status for o in outcomes) for status in order}
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)
