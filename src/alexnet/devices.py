"""Where the work runs: the device of a run, the devices of one model replica, CPU cores.

Device names are torch's ("cpu", "cuda", "cuda:1"); "auto" is CUDA when there is a GPU.
"""

from __future__ import annotations

import os

import torch

from alexnet.errors import BadInput


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`name` as a torch.device; "auto": cuda if available, else cpu. A CUDA device that this
    machine does not have is a clear error, not a crash at the first tensor."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"unknown device {str(name)!r} (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput(f"--device {name}: this machine has no CUDA GPU")
        if dev.index is not None and dev.index >= count:
            raise BadInput(f"--device {name}: this machine has {count} GPU(s), cuda:0..{count - 1}")
    return dev


def model_devices(name: str | torch.device, model_parallel: int = 1) -> list[torch.device]:
    """The devices of one model replica: [d] or, for the paper's two towers (Sec. 3.2), [d, the
    next GPU]. On a CPU both towers' parts run in one process: [cpu, cpu]."""
    if model_parallel not in (1, 2):
        raise BadInput(
            f"--model-parallel must be 1 or 2 (the paper's two towers), got {model_parallel}"
        )
    dev = resolve_device(name)
    if dev.type != "cuda":
        return [dev] * model_parallel
    first = dev.index if dev.index is not None else 0
    count = torch.cuda.device_count()
    if first + model_parallel > count:
        raise BadInput(
            f"--model-parallel {model_parallel} from cuda:{first} needs {model_parallel} GPUs "
            f"(cuda:{first}..cuda:{first + model_parallel - 1}); this machine has {count}"
        )
    return [torch.device("cuda", first + i) for i in range(model_parallel)]


def available_cpus() -> int:
    """The CPU cores this process may use (its affinity mask; os.cpu_count off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def select_device(device: torch.device) -> None:
    """Make a CUDA device the process's current one (a no-op for others): kernels launched
    without an explicit device, the loader's pinned-memory thread and NCCL then use it, and no
    context is made on cuda:0 when the run is on cuda:1."""
    device = torch.device(device)
    if device.type == "cuda":
        # "cuda" without an index is the current device (set_device refuses an index-less one).
        torch.cuda.set_device(
            device.index if device.index is not None else torch.cuda.current_device()
        )
