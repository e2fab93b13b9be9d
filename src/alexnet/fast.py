"""The fast network: a visible, reversible rewrite of a built one (as torch.ao's fuse_modules).

    model = alexnet.build_model("paper")   # plain modules, exact in every dtype
    alexnet.fast.fuse(model)               # in place; print(model) shows what runs now
    alexnet.fast.unfuse(model)             # the plain network back, the same modules

`fuse` turns each conv block's tail into one module, kept at the first stage's name, the others
left as nn.Identity (as fuse_modules does), and the input's padding into one copy:
- pad1 (the 2012 code's zero padding): `ChannelsLastPad`, the padded batch written in one copy,
  channels_last (the operator's layout from conv1 on), in bf16 under CPU bf16 autocast;
- ReLU -> LRN -> max-pool (the paper's conv1 and conv2 blocks, Sec. 3.1, 3.3, 3.4), or LRN ->
  max-pool (layers-145's conv1): `LRNMaxPool`, one operator on CPUs (alexnet.lrn_pool: the
  maps are read once and only the pooled maps are written), the LRN's fast form and the pool
  elsewhere;
- any other LRN (with the ReLU before it, if there is one): `FastLRN`, the LRN's hand-written
  backward and fused kernels (alexnet.lrn).
Each fused module holds the modules it replaced and computes exactly their function; where its
operator does not apply (CUDA, float64/float16, a window wider than 9 maps, a pool other than a
plain nn.MaxPool2d, an ONNX export or jit trace, no C++ compiler) it runs them one by one.

Why a rewrite and not the default: the plain network is what every PyTorch tool expects (hooks
on every layer, exporters, float64); the fused one is 1.1-1.2x faster to train on a CPU
(BENCHMARKS.md) and is what `alexnet train`, the benchmarks and the demo run.
"""

from __future__ import annotations

import torch
from torch import nn

from alexnet import lrn_pool
from alexnet.lrn import LocalResponseNorm, fast_local_response_norm, tracing


def _exported() -> bool:
    # ONNX has no such operator, and a jit trace records what runs: both get the plain layers.
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


class FastLRN(nn.Module):
    """relu (optional) -> LRN with the closed-form backward (alexnet.lrn.fast_local_response_norm):
    the same function as the modules it holds."""

    def __init__(self, norm: LocalResponseNorm, relu: nn.Module | None = None):
        super().__init__()
        self.relu, self.norm = relu, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        relu = self.relu is not None
        if tracing():  # the plain modules, for the tracer to fuse or export
            return n(self.relu(x) if relu else x)
        return fast_local_response_norm(x, n.size, n.alpha, n.beta, n.k, n.groups, relu)


class LRNMaxPool(FastLRN):
    """relu (optional) -> LRN -> max-pool as one operator (alexnet.lrn_pool) where it applies,
    else FastLRN then the pool: the same function as the modules it holds."""

    def __init__(self, norm: LocalResponseNorm, pool: nn.Module, relu: nn.Module | None = None):
        super().__init__(norm, relu)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, geometry = self.norm, lrn_pool.pool_geometry(self.pool)
        if (
            geometry is not None
            and not _exported()
            and lrn_pool.supports(x, n.size, n.groups, geometry[0])
        ):
            relu = self.relu is not None
            return lrn_pool.lrn_max_pool(x, n.size, n.alpha, n.beta, n.k, n.groups, relu, *geometry)
        return self.pool(super().forward(x))


class ChannelsLastPad(nn.Module):
    """pad1 (the 2012 code's zero padding of the image) written with the batch into one
    channels_last tensor, in bfloat16 under CPU bf16 autocast (what conv1 would cast it to: the
    same rounding of the same values): one copy of the batch where the plain stages make two or
    three, and channels_last maps from conv1 on, which the fused operator takes."""

    def __init__(self, pad: nn.ZeroPad2d):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing() or x.device.type != "cpu" or x.dim() != 4:
            return self.pad(x)
        left, right, top, bottom = self.pad.padding
        if min(left, right, top, bottom) < 0:
            return self.pad(x)
        n, c, h, w = x.shape
        dtype = x.dtype
        if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        out = torch.empty(
            (n, c, top + h + bottom, left + w + right),
            dtype=dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )
        out[:, :, top : top + h, left : left + w] = x
        out[:, :, :top] = 0
        out[:, :, top + h :] = 0
        out[:, :, top : top + h, :left] = 0
        out[:, :, top : top + h, left + w :] = 0
        return out


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def fuse(model: nn.Module) -> nn.Module:
    """Rewrite a one-device two-tower network (alexnet.model.AlexNet) in place into its fast
    form and return it; a network with nothing to fuse (torchvision's layout, no LRN, two
    devices) is returned as it is. Loads (building once per machine) the CPU operator, so the
    first call may take seconds."""
    names = [n for n, _ in model.named_children()]
    if not isinstance(model, nn.Sequential) or is_fused(model):
        return model
    if any(isinstance(m, LocalResponseNorm) for m in model):
        param = next(model.parameters(), None)
        if param is None or param.device.type == "cpu":
            lrn_pool.available()  # built and loaded now, not inside a traced forward
    for i, name in enumerate(names):
        norm = getattr(model, name)
        if type(norm) is nn.ZeroPad2d and i == 0:
            setattr(model, name, ChannelsLastPad(norm))
            continue
        if type(norm) is not LocalResponseNorm:
            continue
        before = getattr(model, names[i - 1]) if i > 0 else None
        relu = before if before is not None and _is_relu(before) else None
        after = getattr(model, names[i + 1]) if i + 1 < len(names) else None
        if isinstance(after, nn.MaxPool2d):
            fused: FastLRN = LRNMaxPool(norm, after, relu)
            setattr(model, names[i + 1], nn.Identity())
        else:
            fused = FastLRN(norm, relu)
        setattr(model, name, nn.Identity())
        setattr(model, names[i - 1] if relu is not None else name, fused)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """fuse undone, in place: each fused module's original modules back at their names."""
    names = [n for n, _ in model.named_children()]
    for i, name in enumerate(names):
        fused = getattr(model, name)
        if isinstance(fused, ChannelsLastPad):
            setattr(model, name, fused.pad)
            continue
        if not isinstance(fused, FastLRN):
            continue
        parts = [fused.relu, fused.norm, getattr(fused, "pool", None)]
        parts = [m for m in parts if m is not None]
        for j, m in enumerate(parts):
            setattr(model, names[i + j], m)
    return model


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, (FastLRN, ChannelsLastPad)) for m in model.modules())
