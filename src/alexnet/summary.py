"""`alexnet summary` (per-layer shapes, parameters, multiply-adds) and `alexnet profiles` (the
values on which the profiles differ)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import nn

from alexnet.config import PROFILES, get_profile
from alexnet.model import build_model


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

    for name, module in model.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(record(name, module)))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in hooks:
            h.remove()
    return rows


def summarize(profile: str, input_size: int | None = None, num_classes: int = 1000) -> dict:
    p = get_profile(profile)
    size = input_size or p.model.input_size
    model = build_model(profile, num_classes=num_classes)
    rows = layer_table(model, size)
    return {
        "profile": profile,
        "input": [3, size, size],
        "num_classes": num_classes,
        "layers": rows,
        "total_params": sum(p.numel() for p in model.parameters()),
        "total_macs": sum(r["macs"] for r in rows),
    }


def _print_summary(s: dict) -> None:
    size = "x".join(map(str, s["input"]))
    print(f"profile {s['profile']}, input {size}, {s['num_classes']} classes")
    print(f"{'layer':<10} {'output':>14} {'params':>13} {'mult-adds':>15}")
    for r in s["layers"]:
        shape = "x".join(map(str, r["output"]))
        print(f"{r['layer']:<10} {shape:>14} {r['params']:>13,} {r['macs']:>15,}")
    print(f"{'total':<10} {'':>14} {s['total_params']:>13,} {s['total_macs']:>15,}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def profile_differences() -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """(profile names, [(dotted key, value per profile)]) for every value that differs."""
    names = list(PROFILES)
    flat = [_flatten(dataclasses.asdict(PROFILES[n])) for n in names]
    keys = [k for k in flat[0] if k not in ("name", "description")]
    rows = [(k, [f[k] for f in flat]) for k in keys if len({repr(f[k]) for f in flat}) > 1]
    return names, rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        inner = [f"({_fmt(x)})" if isinstance(x, tuple) else _fmt(x) for x in v]
        return ",".join(inner) or "-"
    return str(v)


def cmd_summary(args) -> int:
    s = summarize(args.profile, args.input, args.num_classes)
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        _print_summary(s)
    return 0


def cmd_profiles(args) -> int:
    names, rows = profile_differences()
    if args.json:
        print(
            json.dumps(
                {k: dict(zip(names, vs, strict=True)) for k, vs in rows}, indent=2, default=str
            )
        )
        return 0
    cells = [[k] + [_fmt(v) for v in vs] for k, vs in rows]
    header = ["value"] + names
    widths = [max(len(str(r[i])) for r in [header, *cells]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    for n in names:
        print(f"{n}: {PROFILES[n].description}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes, parameters and multiply-adds")
    p.add_argument("--profile", default="paper", help=f"one of {', '.join(PROFILES)}")
    p.add_argument("--input", type=int, default=None, help="input side (default: the profile's)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--json", action="store_true", help="print JSON (layers, total_params, total_macs)"
    )
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("profiles", help="a table of every value on which the profiles differ")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)
