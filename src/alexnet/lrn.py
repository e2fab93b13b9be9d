"""Local response normalisation (Sec. 3.3), exact to the printed formula, plain and fast.

    b[i] = a[i] / (k + alpha * sum_{j = i - n//2}^{i + n//2} a[j]^2) ** beta

with the sum clipped at the edges of each tower's maps: the paper's towers normalise their own
maps only (the towers communicate only at conv3 and the FC layers).

Two forms of the one formula:

- `LocalResponseNorm` (the module the network is built of) computes it with plain
  differentiable torch ops: autograd differentiates it; torch.export, torch.compile, ONNX and
  FakeTensorMode trace it like any layer; float64 stays float64 (bf16/fp16 inputs are summed and
  powered in float32 and rounded once).
- `fast_local_response_norm` (what alexnet.fast's rewrite runs) differentiates by hand with the
  closed-form gradient

    d loss / d a[i] = g[i] s[i] - 2 alpha beta a[i] sum_{j in win(i)} g[j] a[j] s[j] / D[j]

  where D = k + alpha * window_sum(a^2) and s = D^-beta, saving only its input; autograd's
  version of the plain form keeps and differentiates every intermediate, which took half of the
  training step (docs/facts.md, "Throughput references"). Its "compiled" backend fuses the
  forward, t = g*a*s/D and the gradient each into one torch.compile kernel (Inductor: a C++/OpenMP
  loop on CPUs, a Triton kernel on GPUs); its "eager" backend uses shifted-slice window sums, for
  tensors too small to be worth a compilation and machines where torch.compile is not
  available. With relu=True it normalises relu(x) with the ReLU fused into the same passes.
  Under torch.compile, torch.export, jit tracing or ONNX export it is the plain form.

Where the LRN is followed by a max-pool on a CPU (the paper's conv1 and conv2 blocks),
alexnet.fast runs ReLU, LRN and pool as one operator instead (alexnet.lrn_pool).

`set_backend("auto" | "compiled" | "eager")` picks the fast form's backend; "auto" (the default)
compiles for tensors of at least COMPILE_MIN_NUMEL elements and falls back to eager, once and with
a warning, if compilation fails. The environment variable ALEXNET_LRN sets the initial choice.

Why one file of this length: the formula, its compiled kernels for both memory formats and
the autograd function are one mechanism; no part stands alone.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "compiled", "eager")
COMPILE_MIN_NUMEL = 1 << 20  # one batch of 2 at conv1's 96x55x55 is 0.6M: tests stay eager
# Distinct (shape, strides, dtype, constants) each get their own static-shape kernel; a static
# kernel is several times faster here than a dynamic-shape one. A training run needs a few (2
# layers x train/eval batch sizes). torch.compile keeps 8 per function by default (its
# recompile limit, left as it is): past that many, this module runs the eager backend.
MAX_COMPILED_KEYS = 8

_state = {"backend": os.environ.get("ALEXNET_LRN", "auto"), "failed": False}
_compiled: dict[str, object] = {}


def set_backend(name: str) -> None:
    """Choose the LRN implementation: "auto" (default), "compiled" or "eager"."""
    if name not in BACKENDS:
        raise ValueError(f"LRN backend {name!r} is not one of {list(BACKENDS)}")
    _state["backend"] = name
    _state["failed"] = False


def get_backend() -> str:
    return _state["backend"]


# --- the formula, written once for both implementations ------------------------------------
def _window_sum(t: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """sum_{|j - i| <= size//2, j in i's group} t[:, j] for every map i, as shifted slices."""
    n, c, h, w = t.shape
    half = size // 2
    tg = t.unflatten(1, (groups, c // groups))  # (N, G, C/G, H, W): windows never cross groups
    p = F.pad(tg, (0, 0, 0, 0, half, half))  # zero maps beyond each group's edges
    cg = c // groups
    out = p[:, :, 0:cg]
    for o in range(1, 2 * half + 1):
        out = out + p[:, :, o : o + cg]
    return out.flatten(1, 2)


def _inv_pow(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d ** -beta; rsqrt/sqrt for the paper's beta = 0.75 (a fraction of pow's cost)."""
    if beta == 0.75:
        r = torch.rsqrt(d)
        return r * torch.sqrt(r)
    if beta == 0.5:
        return torch.rsqrt(d)
    return torch.exp(torch.log(d) * -beta)


def _acc(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 inputs: sums and powers in float32 (free inside a fused kernel); float64 stays.
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _input(x, relu: bool):
    # relu=True: the LRN of relu(x), the ReLU fused into the same pass (Sec. 3.3: "applied after
    # the ReLU"); its gradient is the mask x > 0, as torch's threshold_backward.
    x = _acc(x)
    return torch.relu(x) if relu else x


def _denominator(a, size: int, groups: int, k: float, alpha: float):
    return k + alpha * _window_sum(a * a, size, groups)


def _fwd(x, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    a = _input(x, relu)
    d = _denominator(a, size, groups, k, alpha)
    return (a * _inv_pow(d, beta)).to(x.dtype)


def _bwd_t(g, x, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    # t = g * b / D = g * a * D^-(beta+1): the window-summed term of the gradient. Kept in
    # float32 (it is a small difference term; bf16 would cost accuracy for little speed).
    a = _input(x, relu)
    d = _denominator(a, size, groups, k, alpha)
    return _acc(g) * a * _inv_pow(d, beta) / d


def _bwd_g(g, x, t, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    a = _input(x, relu)
    d = _denominator(a, size, groups, k, alpha)
    grad = _acc(g) * _inv_pow(d, beta) - (2.0 * alpha * beta) * a * _window_sum(t, size, groups)
    if relu:
        grad = torch.where(x > 0, grad, 0.0)
    return grad.to(x.dtype)


# channels_last: the maps of one pixel are contiguous, so the window runs along the innermost
# dimension, where the zero padding of _window_sum costs Inductor a per-lane mask on every
# shifted load (several times slower: BENCHMARKS.md). Instead the squares (and t in the
# backward) are padded once, and the window sums read them with plain shifted loads.
def _cl_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).unflatten(3, (groups, -1))  # (N, H, W, G, C/G), a view


def _cl_ungroup(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(3).permute(0, 3, 1, 2)  # back to (N, C, H, W), channels_last strides


def _cl_pad(t, size: int):
    return F.pad(t, (size // 2, size // 2))


def _cl_squares(x, size: int, groups: int, relu: bool):
    """P, the padded squares (float32 for bf16/fp16 inputs)."""
    a = _input(_cl_groups(x, groups), relu)
    return _cl_pad(a * a, size)


def _cl_window(p: torch.Tensor, size: int, c: int) -> torch.Tensor:
    out = p[..., 0:c]
    for o in range(1, 2 * (size // 2) + 1):
        out = out + p[..., o : o + c]
    return out


def _cl_fwd(x, p, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    a = _input(_cl_groups(x, groups), relu)
    d = k + alpha * _cl_window(p, size, a.shape[-1])
    return _cl_ungroup((a * _inv_pow(d, beta)).to(x.dtype))


def _cl_bwd_t(g, x, p, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    """t = g * a * D^-(beta+1), padded like P."""
    a = _input(_cl_groups(x, groups), relu)
    d = k + alpha * _cl_window(p, size, a.shape[-1])
    return _cl_pad(_acc(_cl_groups(g, groups)) * a * _inv_pow(d, beta) / d, size)


def _cl_bwd_g(g, x, p, tp, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    xg = _cl_groups(x, groups)
    a = _input(xg, relu)
    c = a.shape[-1]
    d = k + alpha * _cl_window(p, size, c)
    win = _cl_window(tp, size, c)
    grad = _acc(_cl_groups(g, groups)) * _inv_pow(d, beta) - (2.0 * alpha * beta) * a * win
    if relu:
        grad = torch.where(xg > 0, grad, 0.0)
    return _cl_ungroup(grad.to(x.dtype))


_PLAIN = {
    "fwd": _fwd,
    "bwd_t": _bwd_t,
    "bwd_g": _bwd_g,
    "cl_sq": _cl_squares,
    "cl_fwd": _cl_fwd,
    "cl_bwd_t": _cl_bwd_t,
    "cl_bwd_g": _cl_bwd_g,
}
_keys: dict[str, set] = {name: set() for name in _PLAIN}


def _key(x: torch.Tensor, consts) -> tuple:
    return (tuple(x.shape), x.stride(), x.dtype, x.device.type, consts)


def _call(name: str, x: torch.Tensor, args: tuple, consts: tuple) -> torch.Tensor:
    """Run step `name` compiled if the backend and size allow, else the plain functions."""
    fn = _PLAIN[name]
    backend = _state["backend"]
    use = backend == "compiled" or (
        backend == "auto" and not _state["failed"] and x.numel() >= COMPILE_MIN_NUMEL
    )
    if use:
        keys = _keys[name]
        key = _key(x, consts)
        if key in keys or len(keys) < MAX_COMPILED_KEYS:
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, dynamic=False)
            try:
                out = _compiled[name](*args, *consts)
                keys.add(key)
                return out
            except Exception as e:  # no C++ compiler, no Triton, ...: formula still holds
                if backend == "compiled":
                    raise
                _state["failed"] = True
                warnings.warn(
                    f"LRN: torch.compile failed ({type(e).__name__}: {e}); using eager LRN",
                    stacklevel=3,
                )
    return fn(*args, *consts)


class _LRNCompiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, groups, k, alpha, beta, relu):
        ctx.cl = _memory_format(x) == torch.channels_last
        c = ctx.consts = (size, groups, float(k), float(alpha), float(beta), bool(relu))
        ctx.save_for_backward(x)  # only x: D (NCHW) or P (channels_last) is recomputed
        if ctx.cl:
            p = _call("cl_sq", x, (x,), (size, groups, c[-1]))
            return _call("cl_fwd", x, (x, p), c)
        return _call("fwd", x, (x,), c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        c = ctx.consts
        (x,) = ctx.saved_tensors
        if ctx.cl:
            g = g.contiguous(memory_format=torch.channels_last)
            p = _call("cl_sq", x, (x,), (c[0], c[1], c[-1]))
            tp = _call("cl_bwd_t", x, (g, x, p), c)
            grad = _call("cl_bwd_g", x, (g, x, p, tp), c)
        else:
            g = g.contiguous()
            t = _call("bwd_t", x, (g, x), c)
            grad = _call("bwd_g", x, (g, x, t), c)
        return grad, None, None, None, None, None, None


# --- eager: the same formula in as few full passes as torch's eager kernels allow ----------
def _window_sum_eager(t: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    n, c, h, w = t.shape
    tg = t.unflatten(1, (groups, c // groups))
    out = tg.clone(memory_format=torch.preserve_format)
    for o in range(1, size // 2 + 1):
        out[:, :, o:] += tg[:, :, :-o]
        out[:, :, :-o] += tg[:, :, o:]
    return out.flatten(1, 2)


def _inv_pow_(d: torch.Tensor, beta: float) -> torch.Tensor:
    """d ** -beta, overwriting d."""
    if beta == 0.75:
        d.rsqrt_()
        return d.mul_(d.sqrt())
    return d.pow_(-beta)


class _LRNEagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, groups, k, alpha, beta):
        a = _acc(x)  # bf16/fp16: in float32, as the compiled and fused forms (one rounding)
        d = _window_sum_eager(a * a, size, groups).mul_(alpha).add_(k)  # D
        s = _inv_pow_(d.clone(), beta)  # s = D^-beta
        ctx.save_for_backward(x, d, s)
        ctx.consts = (size, groups, alpha, beta)
        return (a * s).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, d, s = ctx.saved_tensors
        size, groups, alpha, beta = ctx.consts
        a, g32 = _acc(x), _acc(g)
        t = (g32 * a).mul_(s).div_(d)  # g * a * s / D
        win = _window_sum_eager(t, size, groups)
        grad = win.mul_(a).mul_(-2.0 * alpha * beta).addcmul_(g32, s).to(x.dtype)
        return grad, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _check(x: torch.Tensor, size: int, groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if size < 1:
        raise ValueError(f"LRN size must be positive, got {size}")


def local_response_norm(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
    relu: bool = False,
) -> torch.Tensor:
    """The LRN of Sec. 3.3 over the channels of x (N, C, H, W), each of `groups` separately, in
    plain differentiable torch ops (of relu(x) with relu=True, Sec. 3.3: "applied after the
    ReLU"). float64 is computed in float64; bf16/fp16 in float32, rounded once."""
    _check(x, size, groups)
    return _fwd(x, int(size), int(groups), float(k), float(alpha), float(beta), bool(relu))


# torch.fx's symbolic tracing (torchvision's create_feature_extractor) records a call of this
# function as one node instead of tracing its shape checks (a Proxy has no shape).
torch.fx.wrap("local_response_norm")


def tracing() -> bool:
    """Inside torch.compile, torch.export, jit tracing or an ONNX export: hand-written autograd
    and its kernels give way to the plain ops, which these trace and fuse themselves."""
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )


def fast_local_response_norm(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
    relu: bool = False,
) -> torch.Tensor:
    """local_response_norm's function with the closed-form backward and fused kernels (see the
    module docstring); the plain ops while tracing. x itself is not modified."""
    _check(x, size, groups)
    if tracing():
        return local_response_norm(x, size, alpha, beta, k, groups, relu)
    backend = _state["backend"]
    consts = (int(size), int(groups), float(k), float(alpha), float(beta))
    if backend == "compiled" or (
        backend == "auto" and not _state["failed"] and x.numel() >= COMPILE_MIN_NUMEL
    ):
        return _LRNCompiledFunction.apply(x, *consts, bool(relu))
    return _LRNEagerFunction.apply(torch.relu(x) if relu else x, *consts)


class LocalResponseNorm(nn.Module):
    """Cross-map LRN (Sec. 3.3) over a whole layer's maps, each tower (group) on its own; the
    plain form (alexnet.fast swaps in the fast one)."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, alpha={self.alpha:g}, beta={self.beta:g}, k={self.k:g}, "
            f"groups={self.groups}"
        )


class SpatialResponseNorm(nn.Module):
    """layers-145's "rnorm" after conv2's LRN: each map normalised over a size x size
    neighbourhood, b = a / (k + alpha * sum_window a^2) ** beta, alpha = scale / size^2
    (cuda-convnet's parser divides the scale by the window area). Only in `cuda-convnet`."""

    def __init__(self, size=5, alpha=0.001 / 25, beta=0.75, k=2.0):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # avg_pool2d with count_include_pad gives the zero-padded window mean; times the area
        # it is the window sum.
        s = F.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
        return x * (s * (self.alpha * self.size**2) + self.k).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha:g}, beta={self.beta:g}, k={self.k:g}"
