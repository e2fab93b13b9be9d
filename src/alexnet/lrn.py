"""Local response normalisation (Sec. 3.3), fast on the CPU and exact to the printed formula.

    b[i] = a[i] / (k + alpha * sum_{j = i - n//2}^{i + n//2} a[j]^2) ** beta

with the sum clipped at the edges of each tower's maps: the paper's towers normalise their own
maps only (the towers communicate only at conv3 and the FC layers).

Why not torch.nn.LocalResponseNorm: it builds the window sum with avg_pool3d over a padded copy
and lets autograd differentiate every intermediate; here that took half of the training step
(../shared/alexnet-facts.md, "Throughput references"). This module computes the window sum as a
banded channel matrix product (one GEMM, which oneDNN/cuBLAS run at full speed in any memory
format) and differentiates by hand with the closed-form gradient

    d loss / d a[i] = g[i] * s[i] - 2 * alpha * beta * a[i] * sum_{j in win(i)} g[j] * b[j] / D[j]

where D = k + alpha * window_sum(a^2), s = D^-beta and b = a * s; win is symmetric, so the same
banded matrix serves forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def band_matrix(channels: int, size: int, groups: int, device=None, dtype=None) -> torch.Tensor:
    """(C, C) matrix M with M[i, j] = 1 when j is in i's window of `size` maps within i's group."""
    idx = torch.arange(channels, device=device)
    group = idx // (channels // groups)
    near = (idx[:, None] - idx[None, :]).abs() <= size // 2
    same = group[:, None] == group[None, :]
    return (near & same).to(dtype or torch.float32)


def _window_sum(t: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    # A 1x1 convolution with the band matrix sums each map's window over channels.
    return F.conv2d(t, band[:, :, None, None])


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, band, k: float, alpha: float, beta: float):
        d = _window_sum(x * x, band).mul_(alpha).add_(k)  # D = k + alpha * window_sum(a^2)
        scale = d.pow(-beta)
        ctx.save_for_backward(x, d, scale, band)
        ctx.alpha, ctx.beta = alpha, beta
        return x * scale

    @staticmethod
    def backward(ctx, g):
        x, d, scale, band = ctx.saved_tensors
        t = g * x * scale / d  # g[j] * b[j] / D[j]
        win = _window_sum(t, band)
        grad = g * scale - (2.0 * ctx.alpha * ctx.beta) * x * win
        return grad, None, None, None, None


def local_response_norm(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
) -> torch.Tensor:
    """The LRN of Sec. 3.3 over the channels of x (N, C, H, W), each of `groups` separately."""
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c % groups:
        raise ValueError(f"{c} channels do not split into {groups} groups")
    band = band_matrix(c, size, groups, device=x.device, dtype=x.dtype)
    return _LRNFunction.apply(x, band, float(k), float(alpha), float(beta))


class ResponseNorm(nn.Module):
    """Cross-map LRN (Sec. 3.3) taking a whole layer's maps; each tower (group) on its own."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        g = self.groups if groups is None else groups
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, g)

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
