"""Local response normalisation (Sec. 3.3), fast on the CPU and exact to the printed formula.

    b[i] = a[i] / (k + alpha * sum_{j = i - n//2}^{i + n//2} a[j]^2) ** beta

with the sum clipped at the edges of each tower's maps: the paper's towers normalise their own
maps only (the towers communicate only at conv3 and the FC layers).

Why not torch.nn.LocalResponseNorm: it builds the window sum with avg_pool3d over a padded copy
and lets autograd keep and differentiate every intermediate; here that took half of the training
step (docs/facts.md, "Throughput references"). This module differentiates by hand,
with the closed-form gradient

    d loss / d a[i] = g[i] s[i] - 2 alpha beta a[i] sum_{j in win(i)} g[j] a[j] s[j] / D[j]

where D = k + alpha * window_sum(a^2) and s = D^-beta; the window is symmetric, so the same
window sum serves forward and backward. It saves only its input: in NCHW the window sum of a^2
is recomputed inside the backward kernels from a few cached loads; in channels_last the padded
squares P and the padded t of the backward live in buffers the function keeps and reuses (see
_cl_groups and _Buffers), so a step allocates only the LRN's output and its gradient. With
relu=True it normalises relu(x) with the ReLU fused in (the paper's conv -> ReLU -> LRN): one
pass less over the layer's output forward and one backward.

Two implementations of the same formula, both checked against a float64 loop of the formula in
tests/test_lrn.py:

- "compiled": the forward, t = g*a*s/D and the gradient each fused by torch.compile (Inductor:
  one C++/OpenMP loop on CPUs, one Triton kernel on GPUs) into a single pass that reads a few
  tensors and writes one (several times faster than the eager form: BENCHMARKS.md).
- "eager": shifted-slice window sums with in-place updates, for tensors too small to be worth a
  compilation, and for machines where torch.compile is not available (no C++ compiler, ...).

Where the LRN is followed by a max-pool on a CPU (the paper's conv1 and conv2 blocks), the caller
passes the pool and alexnet.lrn_pool computes ReLU, LRN and pool in one kernel instead.

`set_backend("auto" | "compiled" | "eager")` picks one; "auto" (the default) compiles for tensors
of at least COMPILE_MIN_NUMEL elements and falls back to eager, once and with a warning, if
compilation fails. The environment variable ALEXNET_LRN sets the initial choice. The first
batch of a new shape compiles its kernels (seconds; cached on disk by torch afterwards).

Why one file of this length: the formula, its compiled kernels for both memory formats,
their scratch buffers and the autograd function are one mechanism; no part stands alone.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch
import torch._dynamo.config as dynamo_config
import torch.nn.functional as F
from torch import nn

from alexnet import lrn_pool

BACKENDS = ("auto", "compiled", "eager")
COMPILE_MIN_NUMEL = 1 << 20  # one batch of 2 at conv1's 96x55x55 is 0.6M: tests stay eager
# Distinct (shape, strides, dtype, constants) each get their own static-shape kernel; a static
# kernel is several times faster here than a dynamic-shape one. A training run needs a few (2
# layers x train/eval batch sizes), `alexnet bench model` 24 (3 profiles x 2 layers x 2 dtypes x
# 2 layouts). torch._dynamo's per-function recompile limit is raised to this; past it, eager.
MAX_COMPILED_KEYS = 32

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
# shifted load (several times slower than the padded buffers: BENCHMARKS.md). Instead the padded
# squares P and the padded t of the backward are written once each into kept buffers
# (_Buffers), and the window sums read them with plain shifted loads.
def _cl_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).unflatten(3, (groups, -1))  # (N, H, W, G, C/G), a view


def _cl_ungroup(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(3).permute(0, 3, 1, 2)  # back to (N, C, H, W), channels_last strides


def _cl_pad(t, size: int):
    return F.pad(t, (size // 2, size // 2))


def _cl_padded_squares(x, size: int, groups: int, relu: bool):
    a = _input(_cl_groups(x, groups), relu)
    return _cl_pad(a * a, size)


def _cl_squares_into(p, x, size: int, groups: int, relu: bool):
    """P (the padded squares) written into the kept buffer p (no fresh allocation)."""
    return p.copy_(_cl_padded_squares(x, size, groups, relu))


def _cl_window(p: torch.Tensor, size: int, c: int) -> torch.Tensor:
    p = _acc(p)  # a buffer kept in bf16 is summed in float32
    out = p[..., 0:c]
    for o in range(1, 2 * (size // 2) + 1):
        out = out + p[..., o : o + c]
    return out


def _cl_fwd(x, p, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    a = _input(_cl_groups(x, groups), relu)
    d = k + alpha * _cl_window(p, size, a.shape[-1])
    return _cl_ungroup((a * _inv_pow(d, beta)).to(x.dtype))


def _cl_bwd_t(g, x, p, size: int, groups: int, k: float, alpha: float, beta: float, relu: bool):
    a = _input(_cl_groups(x, groups), relu)
    d = k + alpha * _cl_window(p, size, a.shape[-1])
    return _acc(_cl_groups(g, groups)) * a * _inv_pow(d, beta) / d


def _cl_bwd_t_into(tview, g, x, p, size: int, groups: int, k, alpha, beta, relu: bool):
    """t written straight into the interior of the kept padded buffer (its margins stay 0)."""
    return tview.copy_(_cl_bwd_t(g, x, p, size, groups, k, alpha, beta, relu))


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
    "cl_sq": _cl_squares_into,
    "cl_fwd": _cl_fwd,
    "cl_bwd_t": _cl_bwd_t_into,
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
    if use and not torch.compiler.is_compiling():
        keys = _keys[name]
        key = _key(x, consts)
        if key in keys or len(keys) < MAX_COMPILED_KEYS:
            if name not in _compiled:
                limit = max(dynamo_config.recompile_limit, MAX_COMPILED_KEYS)
                dynamo_config.recompile_limit = limit
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


class _Buffers(threading.local):
    """The channels_last path's scratch tensors, kept and reused: P and the padded t are
    internal to one forward or one backward call (never returned, never saved for later), so
    the next call may overwrite them. A fresh tensor of that size costs a page fault per 4 KiB
    on every step (glibc returns large blocks to the kernel on free): reusing them halved the
    two LRN layers' time in a plain training loop (BENCHMARKS.md). One set per thread, the few
    most recent shapes only."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.tags: dict[tuple, tuple] = {}  # what a buffer holds now (see _p_tag)
        self.count = 0

    @staticmethod
    def _key(name: str, shape: tuple, like: torch.Tensor) -> tuple:
        # In `like`'s dtype for bf16/fp16 inputs (half the bytes; the window sums are still
        # done in float32, _cl_window), else float32.
        dtype = like.dtype if like.dtype in (torch.bfloat16, torch.float16) else torch.float32
        return (name, shape, like.device, dtype)

    def get(self, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """The buffer `name` of this shape for inputs like `like`."""
        key = self._key(name, shape, like)
        t = self.tensors.pop(key, None)
        if t is None:  # zero-filled once: the margins of the padded t are never written
            t = torch.zeros(shape, dtype=key[3], device=like.device)
            while len(self.tensors) >= self.keep:
                gone = next(iter(self.tensors))
                self.tensors.pop(gone)
                self.tags.pop(gone, None)
        self.tensors[key] = t  # the most recent last
        return t

    def stamp(self, name: str, shape: tuple, x: torch.Tensor) -> tuple:
        """Record that buffer `name` now holds what was computed from x; returns the stamp."""
        self.count += 1
        version = -1 if x.is_inference() else x._version  # inference tensors keep no version
        tag = (self.count, x.data_ptr(), version)
        self.tags[self._key(name, shape, x)] = tag
        return tag

    def holds(self, name: str, shape: tuple, x: torch.Tensor, tag: tuple | None) -> bool:
        """The buffer still holds what the stamp `tag` recorded (nothing has overwritten it)."""
        return tag is not None and self.tags.get(self._key(name, shape, x)) == tag


_buffers = _Buffers()


def _padded_shape(x: torch.Tensor, size: int, groups: int) -> tuple:
    n, c, h, w = x.shape
    return (n, h, w, groups, c // groups + 2 * (size // 2))


class _LRNCompiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, groups, k, alpha, beta, relu):
        ctx.cl = _memory_format(x) == torch.channels_last
        c = ctx.consts = (size, groups, float(k), float(alpha), float(beta), bool(relu))
        ctx.save_for_backward(x)  # only x: D (NCHW) or P (channels_last) can be recomputed
        ctx.p_tag = None
        if ctx.cl:
            shape = _padded_shape(x, size, groups)
            p = _buffers.get("p", shape, x)
            _call("cl_sq", x, (p, x), (size, groups, c[-1]))
            ctx.p_tag = _buffers.stamp("p", shape, x)
            return _call("cl_fwd", x, (x, p), c)
        return _call("fwd", x, (x,), c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        c = ctx.consts
        if ctx.cl:
            (x,) = ctx.saved_tensors
            size, groups, half = c[0], c[1], c[0] // 2
            g = g.contiguous(memory_format=torch.channels_last)
            # P as the forward left it, unless another call of this shape has overwritten it
            # since (a second forward before this backward, the other tower): then again.
            shape = _padded_shape(x, size, groups)
            p = _buffers.get("p", shape, x)
            if not _buffers.holds("p", shape, x, ctx.p_tag):
                _call("cl_sq", x, (p, x), (size, groups, c[-1]))
                _buffers.stamp("p", shape, x)
            tp = _buffers.get("tp", shape, x)
            _call("cl_bwd_t", x, (tp[..., half : tp.shape[-1] - half], g, x, p), c)
            grad = _call("cl_bwd_g", x, (g, x, p, tp), c)
        else:
            (x,) = ctx.saved_tensors
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
        d = _window_sum_eager(x * x, size, groups).mul_(alpha).add_(k)  # D
        s = _inv_pow_(d.clone(), beta)  # s = D^-beta
        ctx.save_for_backward(x, d, s)
        ctx.consts = (size, groups, alpha, beta)
        return x * s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, d, s = ctx.saved_tensors
        size, groups, alpha, beta = ctx.consts
        t = (g * x).mul_(s).div_(d)  # g * a * s / D
        win = _window_sum_eager(t, size, groups)
        return win.mul_(x).mul_(-2.0 * alpha * beta).addcmul_(g, s), None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def local_response_norm(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
    relu: bool = False,
    pool: nn.Module | None = None,
) -> torch.Tensor:
    """The LRN of Sec. 3.3 over the channels of x (N, C, H, W), each of `groups` separately.

    relu=True normalises relu(x) (the paper's order, Sec. 3.3), with the ReLU fused into the
    LRN's own passes: one pass less over the layer's output forward and backward. x itself is
    not modified. pool: a max-pool applied to the result (Sec. 3.4), in the same pass where
    alexnet.lrn_pool's kernel applies (CPU), else after it."""
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    if size < 1:
        raise ValueError(f"LRN size must be positive, got {size}")
    if pool is not None:
        if lrn_pool.applies(x, pool, groups):
            return lrn_pool.lrn_max_pool(x, size, alpha, beta, k, groups, relu, pool)
        return pool(local_response_norm(x, size, alpha, beta, k, groups, relu))
    backend = _state["backend"]
    consts = (int(size), int(groups), float(k), float(alpha), float(beta))
    if torch.compiler.is_compiling() or not (
        backend == "eager"
        or (backend == "auto" and (_state["failed"] or x.numel() < COMPILE_MIN_NUMEL))
    ):
        # Inside a whole-model torch.compile this traces the plain formula for Inductor to fuse.
        return _LRNCompiledFunction.apply(x, *consts, bool(relu))
    return _LRNEagerFunction.apply(torch.relu(x) if relu else x, *consts)


class ResponseNorm(nn.Module):
    """Cross-map LRN (Sec. 3.3) taking a whole layer's maps; each tower (group) on its own."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(
        self,
        x: torch.Tensor,
        groups: int | None = None,
        relu: bool = False,
        pool: nn.Module | None = None,
    ) -> torch.Tensor:
        """relu=True: the LRN of relu(x), the ReLU fused in; pool: the max-pool after it, fused
        where it can be (see local_response_norm)."""
        g = self.groups if groups is None else groups
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, g, relu, pool)

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
