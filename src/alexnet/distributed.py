"""Data parallelism with torch.distributed (DistributedDataParallel), launched by torchrun.

`torchrun --nproc-per-node N -m alexnet train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `context()`
then initialises the process group (NCCL on GPUs, gloo on CPUs) and gives the trainer a
`Context`. Without those variables training runs in one process and `context()` yields None.

The rule for batch and lr: --batch-size is the GLOBAL batch (default the paper's 128), split
evenly over the ranks, so the lr and the results do not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(backend_device)
        dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def context(device: str = "auto", requested: bool = False):
    """A Context under torchrun (or None in a plain single process)."""
    if not launched_by_torchrun():
        if requested:
            raise ValueError(
                "--distributed needs the torchrun launcher: torchrun --nproc-per-node N "
                "-m alexnet train ... (see the README)"
            )
        yield None
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        yield Context(rank, world, local, dev)
    finally:
        dist.destroy_process_group()
