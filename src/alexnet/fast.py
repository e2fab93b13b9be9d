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
        if tracing() or x.device.type != "cpu" or x.dim() != 4 or min(self.pad.padding) < 0:
            return self.pad(x)
        return _padded_channels_last(x, self.pad.padding)


def _padded_channels_last(x: torch.Tensor, padding) -> torch.Tensor:
    """x zero-padded by (left, right, top, bottom) >= 0 in one copy, channels_last, in the CPU
    autocast dtype when autocast is on for float32 (what a conv would cast it to)."""
    left, right, top, bottom = padding
    n, c, h, w = x.shape
    out = torch.empty(
        (n, c, top + h + bottom, left + w + right),
        dtype=_conv_dtype(x),
        device=x.device,
        memory_format=torch.channels_last,
    )
    out[:, :, top : top + h, left : left + w] = x
    out[:, :, :top] = 0
    out[:, :, top + h :] = 0
    out[:, :, top : top + h, :left] = 0
    out[:, :, top : top + h, left + w :] = 0
    return out


class SpaceToDepthConv(nn.Conv2d):
    """conv1 (with pad1's zero padding) computed as the same convolution on the image's s x s
    blocks: space-to-depth (as in MLPerf's ResNet-50 stems). The padded image's s x s blocks
    become channels (3 -> 3 s^2 maps of side 1/s) and the k x k kernel of stride s becomes a
    ceil(k/s) x ceil(k/s) kernel of stride 1 (zero taps fill it out to a multiple of s). Used
    only where conv1 computes in bfloat16 on a CPU: there oneDNN ran the conv1 stage's forward
    and backward in 75.6 ms instead of 107.5 (batch 64, one thread, Intel Xeon, 2026-12-05;
    the whole training step 809 against 831 ms); in float32 the block form was slower (272
    against 239 ms), so float32 keeps the strided convolution. It is conv1's own module (an
    nn.Conv2d holding the same weight and bias: the same state_dict keys), the padding it
    replaced kept as `pad`; the output is the plain stages' to float rounding (the same
    products, summed in another order)."""

    def __init__(self, conv: nn.Conv2d, pad: nn.ZeroPad2d | None = None):
        nn.Module.__init__(self)
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "transposed",
            "output_padding",
            "groups",
            "padding_mode",
        ):
            setattr(self, name, getattr(conv, name))  # fmt: skip
        self.weight, self.bias = conv.weight, conv.bias
        self.pad = pad if pad is not None else nn.Identity()

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        """A plain 2-D convolution with a stride over 1 (conv1), no dilation, groups or padding
        other than zeros."""
        return (
            type(conv) is nn.Conv2d
            and conv.stride[0] > 1
            and conv.stride[0] == conv.stride[1]
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
        )

    def plain(self) -> tuple[nn.Module, nn.Conv2d]:
        """(the padding, an nn.Conv2d) computing this module's function the plain way, holding
        the same parameters (what unfuse puts back)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, self.bias is not None,
                         self.padding_mode, device="meta")  # fmt: skip
        conv.weight, conv.bias = self.weight, self.bias
        return self.pad, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing() or x.device.type != "cpu" or x.dim() != 4:
            return self._conv_forward(self.pad(x), self.weight, self.bias)
        padding = self.pad.padding if isinstance(self.pad, nn.ZeroPad2d) else (0, 0, 0, 0)
        if _conv_dtype(x) != torch.bfloat16 or min(padding) < 0:
            # float32 and float64: the strided conv measured faster than the block form (and
            # float64 stays exactly the plain stages'); the padded batch in one copy.
            x = _padded_channels_last(x, padding) if min(padding) >= 0 else self.pad(x)
            return self._conv_forward(x, self.weight, self.bias)
        return space_to_depth_conv2d(x, self.weight, self.bias, self.stride[0], self.padding,
                                     padding)  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", space_to_depth={self.stride[0]}"


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU convolution of x computes in (float32 becomes the autocast dtype)."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def space_to_depth_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s: int,
    padding: tuple[int, int] = (0, 0),
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """conv2d(zero_pad(x, pad), weight, bias, stride=s, padding=padding) computed on x's s x s
    blocks (SpaceToDepthConv); pad is (left, right, top, bottom) >= 0, as nn.ZeroPad2d's."""
    n, c, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    left, right, top, bottom = pad
    ph, pw = padding
    ho = (h + top + bottom + 2 * ph - kh) // s + 1
    wo = (w + left + right + 2 * pw - kw) // s + 1
    bh, bw = -(-kh // s), -(-kw // s)  # the block kernel: ceil(k / s) blocks
    # Padded to exactly the rows and columns the block kernel reads (those past the plain conv's
    # last tap meet zero taps), in one channels_last copy in the dtype the conv computes in.
    t, lf = top + ph, left + pw
    pads = (lf, (wo - 1 + bw) * s - w - lf, t, (ho - 1 + bh) * s - h - t)
    if min(pads) < 0:  # a crop (a geometry no profile has)
        x = nn.functional.pad(x, pads).contiguous(memory_format=torch.channels_last)
    else:
        x = _padded_channels_last(x, pads)
    # Pixels (n, i*s + a, j*s + b, c'), channels_last, to (n, i, j, a, b, c') in one copy (runs
    # of s*c contiguous values): maps of s*s*c channels, channel (a*s + b)*c + c' holding pixel
    # (a, b) of map c' in block (i, j).
    hb, wb = x.shape[2] // s, x.shape[3] // s
    blocks = x.permute(0, 2, 3, 1).reshape(n, hb, s, wb, s, c).transpose(2, 3).contiguous()
    blocks = blocks.reshape(n, hb, wb, s * s * c).permute(0, 3, 1, 2)
    # The kernel in the same order: zero taps out to (bh*s, bw*s), then tap (i*s + a, j*s + b)
    # of map c' to channel (a*s + b)*c + c' at block tap (i, j).
    weight = nn.functional.pad(weight, (0, bw * s - kw, 0, bh * s - kh))
    weight = weight.reshape(out_channels, c, bh, s, bw, s).permute(0, 3, 5, 1, 2, 4)
    weight = weight.reshape(out_channels, s * s * c, bh, bw)
    return nn.functional.conv2d(blocks, weight, bias)


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
        first = getattr(model, names[1]) if len(names) > 1 else None
        if i == 0 and type(norm) is nn.ZeroPad2d and SpaceToDepthConv.applies(first):
            setattr(model, names[1], SpaceToDepthConv(first, norm))  # pad1 and conv1
            setattr(model, name, nn.Identity())
            continue
        if i == 0 and SpaceToDepthConv.applies(norm):  # conv1 with no pad1 (Caffe's 227)
            setattr(model, name, SpaceToDepthConv(norm))
            continue
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
        if isinstance(fused, SpaceToDepthConv):
            pad, conv = fused.plain()
            setattr(model, name, conv)
            if i > 0 and isinstance(pad, nn.ZeroPad2d):
                setattr(model, names[i - 1], pad)
            continue
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
    fused = (FastLRN, ChannelsLastPad, SpaceToDepthConv)
    return any(isinstance(m, fused) for m in model.modules())
