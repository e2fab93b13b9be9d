"""The fastest way this hardware runs the network: precision, memory format, compilation.

`default_fast_mode(device)` says what to use; the trainer applies it with `prepare_model`,
`prepare_input` and the `autocast` context. `alexnet bench model` measures every mode against
torchvision's AlexNet in one interleaved run (see BENCHMARKS.md for the figures behind the
defaults below).

What the defaults rest on (every figure in BENCHMARKS.md, "Why the code is shaped so"):
- float32: channels_last is faster for both nets (torch's NCHW max-pool is much slower than its
  NHWC one, and the fused ReLU-LRN-pool operator takes channels_last maps).
- bfloat16 autocast: well ahead of float32 where the CPU has native bf16 (oneDNN runs bf16 dot
  products natively); bf16+cl is the two-tower net's fastest mode there.
- torch.compile of the whole model: slower than eager on CPUs (oneDNN already runs the convs
  and matmuls; Inductor's pools cost more than its fusion saves), so it stays off by default.
  The LRN alone is compiled (alexnet.lrn).
- glibc's malloc returns every block above 32 MiB to the kernel on free and page-faults it back
  in on the next allocation: `tune_cpu_allocator` keeps them, a process-wide setting that
  `alexnet train` and `alexnet evaluate` make (prepare_model) and that a user's own script can
  make with one call; build_model and alexnet.fast.fuse never do. It is the one mechanism here
  that keeps memory between steps (BENCHMARKS.md measures the step with and without it).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from dataclasses import dataclass

import torch

from alexnet import fast
from alexnet.errors import BadInput


@dataclass(frozen=True)
class FastMode:
    channels_last: bool = False  # NHWC: what oneDNN and cuDNN convolutions run fastest
    autocast_dtype: str | None = None  # "bfloat16": matmuls/convs in bf16, the loss in fp32
    compile: bool = False  # torch.compile the whole model

    @property
    def label(self) -> str:
        """Short name used by `alexnet bench model`: fp32, bf16+cl, fp32+cl+compile, ..."""
        parts = [{None: "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.autocast_dtype]]
        if self.channels_last:
            parts.append("cl")
        if self.compile:
            parts.append("compile")
        return "+".join(parts)

    @classmethod
    def from_label(cls, label: str) -> FastMode:
        """Inverse of `label`: "bf16+cl" -> FastMode(channels_last=True, autocast_dtype=...)."""
        parts = label.split("+")
        dtypes = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
        extra = set(parts[1:]) - {"cl", "compile"}
        if parts[0] not in dtypes or extra:
            raise BadInput(
                f"unknown mode {label!r}: a precision (fp32, bf16, fp16) optionally followed by "
                "+cl and/or +compile, e.g. bf16+cl"
            )
        return cls("cl" in parts, dtypes[parts[0]], "compile" in parts)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX) on this CPU; without it bf16 is emulated
    (and slower than float32), so the CPU default stays float32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    try:
        return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return native


def default_fast_mode(device: str | torch.device) -> FastMode:
    """What measured fastest: bf16 autocast + channels_last on GPUs and on CPUs with native bf16;
    float32 + channels_last on other CPUs. torch.compile stays off (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return FastMode(channels_last=True, autocast_dtype="bfloat16")
    return FastMode(channels_last=True, autocast_dtype="bfloat16" if cpu_has_bf16() else None)


_allocator = {"tuned": False}


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the process (glibc): no page faults per allocation.

    glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmap()s and unmaps
    them on free, so every large activation of every step is page-faulted and zeroed by the
    kernel again; this measured 4-8x the cost of the arithmetic of a pointwise op on a
    batch-128 activation here. M_MMAP_MAX = 0 serves them from the heap, and a high
    M_TRIM_THRESHOLD keeps the heap's top. The price: the process keeps its peak memory.
    Returns whether the setting is (now) in effect; a no-op off glibc.
    """
    if _allocator["tuned"]:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    _allocator["tuned"] = ok
    return ok


def prepare_model(model: torch.nn.Module, mode: FastMode) -> torch.nn.Module:
    """The model in its fast form (alexnet.fast.fuse) and the mode's memory format (in place;
    the same module is returned). On a CPU it also applies `tune_cpu_allocator` (process-wide)."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cpu":
        tune_cpu_allocator()
    fast.fuse(model)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def prepare_input(x: torch.Tensor, mode: FastMode) -> torch.Tensor:
    """A batch in the mode's memory format."""
    if mode.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def maybe_compile(module: torch.nn.Module, mode: FastMode) -> torch.nn.Module:
    """torch.compile'd when the mode says so. Compile the outermost wrapper (DDP included); keep
    the plain module for state_dict, whose keys a compiled wrapper would prefix."""
    return torch.compile(module) if mode.compile else module


def configure_backends(device: str | torch.device) -> None:
    """Backend settings for training on `device`. On CUDA: cudnn.benchmark, since a run's
    shapes are fixed, cuDNN times its algorithms once per shape and keeps the fastest; conv1
    (stride 4, 3 input maps, channels_last) and conv2's grouped convolution depend on the
    algorithm chosen. Nothing changes on a CPU (the CPU path stays as measured)."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(mode: FastMode, device: str | torch.device):
    if mode.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, mode.autocast_dtype))
