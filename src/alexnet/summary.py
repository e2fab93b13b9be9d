"""A network's per-layer output shapes, parameters and multiply-adds (`alexnet summary`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from alexnet.config import Profile, get_profile
from alexnet.model import AlexNet, build_model


def layer_table(model: nn.Module, input_size: int) -> list[dict[str, Any]]:
    """One row per leaf module, in the order the forward pass calls them.

    Multiply-adds are counted from the layer's definition: a convolution costs
    out_elements * (in_channels / groups) * kh * kw, a linear layer in * out.
    """
    rows: list[dict[str, Any]] = []
    hooks = []

    def shape_of(out):
        if isinstance(out, list):  # the two-tower layers return one tensor per device
            return [int(sum(o.shape[1] for o in out)), *out[0].shape[2:]]
        return list(out.shape[1:])

    def record(name, module):
        def hook(_m, inputs, out):
            params = sum(p.numel() for p in module.parameters(recurse=False))
            shape = shape_of(out)
            macs = 0
            w = getattr(module, "weight", None)
            weight = module.whole("weight") if hasattr(module, "whole") else w
            if weight is not None and weight.dim() == 4:
                macs = int(torch.tensor(shape).prod()) * weight[0].numel()
            elif weight is not None and weight.dim() == 2:
                macs = weight.numel()
            rows.append({"layer": name, "output": shape, "params": params, "macs": macs})

        return hook

    if isinstance(model, AlexNet):  # its stages, those that compute (not ReLU, dropout, flatten)
        layers = [(n, m) for n, m in model.named_children()]
        layers = [(n, m) for n, m in layers if not n.startswith(("act", "drop", "flatten", "pad"))]
    else:  # torchvision's layout: every leaf module
        layers = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    for name, module in layers:
        hooks.append(module.register_forward_hook(record(name, module)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return rows


def summarize(
    profile: str | Profile, input_size: int | None = None, num_classes: int = 1000, **overrides
) -> dict:
    """The layer table of a profile's network (with model overrides, e.g. conv6=True)."""
    p = get_profile(profile) if isinstance(profile, str) else profile
    size = input_size or p.model.input_size
    model = build_model(p, num_classes=num_classes, **overrides)
    rows = layer_table(model, size)
    return {
        "profile": p.name,
        "overrides": overrides,
        "input": [3, size, size],
        "num_classes": num_classes,
        "layers": rows,
        "total_params": sum(p.numel() for p in model.parameters()),
        "total_macs": sum(r["macs"] for r in rows),
    }
