"""The two towers of Sec. 3.2 as layers that run on one device or on two.

Every stage of the two-device net (alexnet.model.TwoDeviceAlexNet) takes and returns a list of
tensors, one per device ("parts"): tower A's maps on the first device and tower B's on the
second. (On one device the towers are grouped convolutions: alexnet.model.AlexNet.)
Activations cross between devices only where the paper's towers communicate: into conv3 and
the fully connected layers.

`TowerConv` and `TowerLinear` hold their weights whole on one device, or as one slice of output
units per device; their state_dict always holds one whole tensor per layer (conv2.weight is
256x48x5x5 whatever the devices), so weights move freely between the layouts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.lrn import LocalResponseNorm, local_response_norm

Parts = list[torch.Tensor]


def gather(xs: Parts, device: torch.device) -> torch.Tensor:
    """All parts' maps (or units) on one device, tower A's first: the whole layer."""
    if len(xs) == 1:
        return xs[0].to(device)
    return torch.cat([x.to(device) for x in xs], 1)


class _TowerLayer(nn.Module):
    """A conv or linear layer held as one slice of output units per device. The state_dict
    holds the whole tensors."""

    def __init__(self, weight_shape, devices, splits: Sequence[int]):
        super().__init__()
        self.devices = [torch.device(d) for d in devices]
        if len(self.devices) < 2:
            raise ValueError("a tower layer spans two or more devices (one device: nn.Conv2d)")
        self.splits = list(splits)  # output units held by each part
        # Plain attributes weight_0, weight_1, ... (no child module), so that the state_dict
        # overrides below are the only view of this layer's tensors.
        for i, (n, d) in enumerate(zip(self.splits, self.devices, strict=True)):
            self.register_parameter(
                f"weight_{i}", nn.Parameter(torch.empty((n, *weight_shape[1:]), device=d))
            )
            self.register_parameter(f"bias_{i}", nn.Parameter(torch.empty(n, device=d)))

    @property
    def weights(self) -> list[nn.Parameter]:
        return [getattr(self, f"weight_{i}") for i in range(len(self.devices))]

    @property
    def biases(self) -> list[nn.Parameter]:
        return [getattr(self, f"bias_{i}") for i in range(len(self.devices))]

    def whole(self, name: str) -> torch.Tensor:
        """The layer's whole weight or bias (on the first device)."""
        parts = self.weights if name == "weight" else self.biases
        return torch.cat([p.to(self.devices[0]) for p in parts])

    @torch.no_grad()
    def init_(self, std: float, bias: float, generator: torch.Generator | None = None) -> None:
        # Draw the whole tensor on the CPU so that every device layout gets identical weights.
        for name, fill in (("weight", None), ("bias", bias)):
            shape = self.whole(name).shape
            value = (
                torch.full(shape, float(fill))
                if fill is not None
                else torch.randn(shape, generator=generator) * std
            )
            self._set_whole(name, value)

    @torch.no_grad()
    def _set_whole(self, name: str, value: torch.Tensor) -> None:
        parts = self.weights if name == "weight" else self.biases
        for p, chunk in zip(parts, value.split(self.splits), strict=True):
            p.copy_(chunk)

    # state_dict / load_state_dict see one tensor per layer, whatever the devices.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in ("weight", "bias"):
            t = self.whole(name)
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        for name in ("weight", "bias"):
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            value, expected = state_dict[key], self.whole(name).shape
            if value.shape != expected:
                errors.append(f"size mismatch for {key}: {tuple(value.shape)} vs {tuple(expected)}")
                continue
            self._set_whole(name, value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix) :] not in ("weight", "bias"):
                    unexpected.append(key)


class TowerConv(_TowerLayer):
    """A convolution of the two-tower net. `cross`: every output map sees all input maps (conv1
    sees the image; conv3 both towers' conv2 maps); otherwise each tower's maps see only their
    own tower's input maps (grouped)."""

    def __init__(self, cin, cout, kernel, stride, pad, cross, towers, devices):
        self.cross, self.towers, self.stride, self.pad = cross, towers, stride, pad
        per_tower_in = cin if cross else cin // towers
        super().__init__(
            (cout, per_tower_in, kernel, kernel), devices, [cout // len(devices)] * len(devices)
        )

    def forward(self, xs: Parts) -> Parts:
        if self.cross:  # every tower's maps onto each device (Sec. 3.2)
            xs = [gather(xs, d) for d in self.devices]
        return [
            F.conv2d(x, w, b, self.stride, self.pad)
            for x, w, b in zip(xs, self.weights, self.biases, strict=True)
        ]


class TowerLinear(_TowerLayer):
    """A fully connected layer: every unit sees all inputs (the towers communicate, Sec. 3.2)."""

    def __init__(self, fin, fout, devices):
        n = len(devices)
        splits = [math.ceil(fout / n)] * (n - 1)
        splits.append(fout - sum(splits))
        super().__init__((fout, fin), devices, splits)

    def forward(self, xs: Parts) -> Parts:
        return [
            F.linear(gather(xs, d), w, b)
            for d, w, b in zip(self.devices, self.weights, self.biases, strict=True)
        ]


class Each(nn.Module):
    """A per-tensor function (activation, pooling, flattening) applied to every part."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, xs: Parts) -> Parts:
        return [self.fn(x) for x in xs]


class TowerNorm(nn.Module):
    """An LRN over the maps of each tower (or of the whole layer, `across`, Caffe): each part is
    a tower, normalised on its own; a window across the towers normalises the gathered layer."""

    def __init__(self, norm: LocalResponseNorm, across: bool):
        super().__init__()
        self.norm, self.across = norm, across

    def forward(self, xs: Parts) -> Parts:
        n = self.norm
        if self.across:
            whole = local_response_norm(gather(xs, xs[0].device), n.size, n.alpha, n.beta, n.k)
            parts = whole.split([x.shape[1] for x in xs], 1)
            return [p.to(x.device) for p, x in zip(parts, xs, strict=True)]
        return [local_response_norm(x, n.size, n.alpha, n.beta, n.k) for x in xs]

    def extra_repr(self) -> str:
        return f"across_towers={self.across}"
