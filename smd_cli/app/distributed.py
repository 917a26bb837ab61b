"""Sharing a batch among processes, one per GPU, with Hugging Face Accelerate.

Each process joins the group a launcher set up (`accelerate launch`, torchrun, or `launch` here),
takes every n-th image, and the outcomes are gathered so that the main process sums them up.
No torch at import.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


@dataclass
class Shard:
    """This process's place among the processes sharing a batch."""

    rank: int = 0
    size: int = 1
    state: Any = None  # accelerate's PartialState when distributed

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shared(self) -> bool:
        return self.size > 1 and self.state is not None

    def take(self, items: list[T]) -> list[T]:
        """Items rank, rank + size, ...: an even share, whatever the order of their costs."""
        return items[self.rank :: self.size]

    def least(self, value: int | None) -> int | None:
        """The smallest of every process's `value` (None where unknown)."""
        if not self.shared:
            return value
        from accelerate.utils import gather_object

        known = [v for v in gather_object([value]) if v is not None]
        return min(known) if known else None

    def same(self, value: T) -> T:
        """The main process's `value`, in every process (seeds drawn at random, for one)."""
        if not self.shared:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def close(self) -> None:
        """Leave the process group: its threads must end before the process does, or the C++
        runtime aborts the process at exit."""
        if self.shared:
            self.state.destroy_process_group()

    def gather(self, rows: list[T]) -> list[T]:
        """Every process's `rows`, on every process, in rank order."""
        if not self.shared:
            return rows
        from accelerate.utils import gather_object

        return gather_object(rows)


def launched_distributed() -> bool:
    """True inside `accelerate launch` (or torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join_processes(cpu: bool) -> Shard:
    """Join the process group the launcher set up; each process learns its rank."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return Shard(rank=state.process_index, size=state.num_processes, state=state)


def process_count(processes: int | None, device: str) -> int:
    """`processes`, else one per visible GPU (one on the CPU)."""
    if processes is not None:
        return processes
    if device == "cpu":
        return 1
    import torch

    return torch.cuda.device_count()


def launch(argv: Sequence[str], count: int, device: str) -> int:
    """Run `python -m smd_cli ARGV` in `count` processes and return the batch's exit code.

    The processes get the environment a launcher such as `accelerate launch` gives them (rank,
    world size, where to meet), and Accelerate joins them into one group. A Ctrl-C reaches them
    all; each keeps what it finished and says so, and the code is then 130.
    """
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shared = dict(os.environ, WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
    if device == "cpu":  # CPU processes share the cores instead of each taking all of them
        shared.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    workers = [subprocess.Popen([sys.executable, "-m", "smd_cli", *argv],
                                env=dict(shared, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(count)]
    try:
        codes = _wait(workers)
    except KeyboardInterrupt as exc:  # a terminal's Ctrl-C reached them too; pass on SIGTERM or SIGHUP
        signum = getattr(exc, "signum", signal.SIGINT)
        for worker in workers:
            if signum != signal.SIGINT:
                worker.send_signal(signum)
        for worker in workers:  # let them finish their summaries
            worker.wait()
        return 128 + signum
    # Every process sums up the same gathered outcomes; a different code means one of them crashed.
    return codes[0] if len(set(codes)) == 1 else max(abs(c) for c in codes)


STRAGGLER_SECONDS = 60.0  # after one process failed, how long the others may take to finish


def _wait(workers: list[subprocess.Popen]) -> list[int]:
    """The workers' exit codes. A worker that dies alone would leave the others waiting for it at
    the final gather for ever: after it, the others get `STRAGGLER_SECONDS`, then are stopped."""
    failed_at = None
    while any(worker.poll() is None for worker in workers):
        if failed_at is None and any(worker.returncode not in (None, 0) for worker in workers):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > STRAGGLER_SECONDS:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        time.sleep(0.1)
    return [worker.returncode for worker in workers]
