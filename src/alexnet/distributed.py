"""Data parallelism with torch.distributed (DistributedDataParallel), launched by torchrun.

`torchrun --nproc-per-node N -m alexnet train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `context()`
then initialises the process group (NCCL on GPUs, gloo on CPUs) and gives the trainer a
`Context`. Without those variables training runs in one process and `context()` yields None.

The rule for batch and lr: --batch-size is the GLOBAL batch (default the paper's 128), split
evenly over the ranks, so the lr and the results do not depend on the number of ranks.

With --model-parallel 2 every rank is one replica of the paper's two-tower net on two GPUs
(local rank l drives cuda:2l and cuda:2l+1), so a node with 8 GPUs runs 4 ranks; DDP then
averages the gradients of the replicas (device_ids=None, as DDP wants for multi-device modules).
`--device cuda:k` starts the node's GPUs at k (local rank l drives cuda:k+l, or cuda:k+2l and
cuda:k+2l+1); `--device cpu` runs every rank on the CPU with gloo.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from alexnet.devices import resolve_device, select_device
from alexnet.errors import BadInput


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device  # the first of `devices`: inputs, outputs, the loss
    devices: list[torch.device]  # one model replica's devices (two with --model-parallel 2)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        one_gpu = self.device.type == "cuda" and len(self.devices) == 1
        return DDP(model, device_ids=[self.device.index] if one_gpu else None)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(backend_device)
        dist.all_reduce(t)
        return t.cpu()

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(backend_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank calls it at the same point)."""
        return bool(self.all_reduce_max(torch.tensor([float(flag)])).item())

    def all_reduce_min(self, x: float) -> float:
        return -float(self.all_reduce_max(torch.tensor([-x], dtype=torch.float64)).item())

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s `obj` on every rank (pickled between this job's own processes)."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


def rank_devices(
    device: torch.device, local_rank: int, model_parallel: int, gpus: int
) -> list[torch.device]:
    """The GPUs of local rank `local_rank`: from the --device's index (0 for "cuda") on, each
    rank taking `model_parallel` consecutive GPUs."""
    first = (device.index or 0) + local_rank * model_parallel
    if first + model_parallel > gpus:
        start = device.index or 0
        raise BadInput(
            f"local rank {local_rank} with --model-parallel {model_parallel} from cuda:{start} "
            f"needs cuda:{first}..cuda:{first + model_parallel - 1}; this node has {gpus} GPUs: "
            f"launch at most {(gpus - start) // model_parallel} processes per node"
        )
    return [torch.device("cuda", first + i) for i in range(model_parallel)]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun announces it (0 without torchrun), before `context`."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


@contextlib.contextmanager
def context(device: str = "auto", requested: bool = False, model_parallel: int = 1):
    """A Context under torchrun (or None in a plain single process)."""
    if not launched_by_torchrun():
        if requested:
            raise BadInput(
                "--distributed needs the torchrun launcher: torchrun --nproc-per-node N "
                "-m alexnet train ... (see the README)"
            )
        yield None
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        devices = rank_devices(dev, local, model_parallel, torch.cuda.device_count())
        select_device(devices[0])  # before NCCL: its communicator is made on the current device
    elif dev.type == "cpu":
        devices = [dev] * model_parallel
    else:
        raise BadInput(f"--device {device}: data parallel training runs on cuda or cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    try:
        yield Context(rank, world, local, devices[0], devices)
    finally:
        dist.destroy_process_group()
