"""Large tensors that leave the hot path (a layer's output, a gradient, the network's input),
kept and handed out again once nothing holds them any more.

Why: glibc's malloc serves blocks over 32 MB with a fresh mmap and returns them to the kernel on
free, so a new 74 MB tensor (conv1's maps at batch 128 in bfloat16) costs a page fault per 4 KiB
on every step: 18.7 ms to allocate and fill it, against 2.0 ms to fill a kept one (BENCHMARKS.md,
"Why the code is shaped so"). torchvision's net pays this too; the paper's, with its larger
early layers, pays more. A kept tensor is never handed out twice while in use: `empty` gives an
alias (a new tensor on the same storage) and reuses the storage only when no alias is alive: no
autograd graph, no caller, no view holds it (the storage's reference count says so).
"""

from __future__ import annotations

import threading

import torch


def _storage_users(t: torch.Tensor) -> int | None:
    """How many tensors (and storage objects) hold t's storage; None where torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return count(t.untyped_storage()._cdata)


class KeptTensors(threading.local):
    """Tensors kept between calls, one set per thread, the `keep` most recently used."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self.tensors: dict[tuple, tuple[torch.Tensor, int]] = {}  # key -> (tensor, its users)

    def empty(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """An uninitialised tensor like torch.empty's, on a kept storage if that one is free."""
        inference = torch.is_inference_mode_enabled()  # inference tensors cannot enter autograd
        key = (name, tuple(shape), dtype, torch.device(device), memory_format, inference)
        kept = self.tensors.pop(key, None)
        if kept is None or _storage_users(kept[0]) != kept[1]:
            t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
            users = _storage_users(t)
            if users is None:  # no way to tell when it is free: never reuse
                return t
            kept = (t, users)
            while len(self.tensors) >= self.keep:
                self.tensors.pop(next(iter(self.tensors)))
        self.tensors[key] = kept  # the most recently used last
        return kept[0].detach()  # an alias: while it (or anything made from it) lives, not free

    def clear(self) -> None:
        self.tensors.clear()


kept = KeptTensors()


def release_kept_tensors() -> None:
    """Free the tensors kept for reuse in this thread (557 MB after training steps of the paper's
    net at batch 128 in bf16, 396 MB in float32: README, "Speed on a CPU")."""
    kept.clear()
