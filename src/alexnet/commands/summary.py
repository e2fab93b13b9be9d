"""`alexnet summary` and `alexnet profiles`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from alexnet.config import (
    PROFILES,
    apply_overrides,
    check_input_size,
    check_model_config,
    get_profile,
    profile_differences,
)
from alexnet.errors import BadInput
from alexnet.summary import summarize


def run_summary(args) -> int:
    profile = apply_overrides(get_profile(args.profile), args.set)
    if args.input is not None:  # the network for that input side
        check_input_size(profile.model, args.input, "--input")
        model = dataclasses.replace(profile.model, input_size=args.input)
        profile = dataclasses.replace(profile, model=model)
    if args.num_classes < 1:
        raise BadInput(f"--num-classes must be at least 1, got {args.num_classes}")
    check_model_config(profile.model)  # an input size the network takes, before building it
    s = summarize(profile, None, args.num_classes)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    size = "x".join(map(str, s["input"]))
    sets = f" ({', '.join(args.set)})" if args.set else ""
    print(f"profile {s['profile']}{sets}, input {size}, {s['num_classes']} classes")
    print(f"{'layer':<10} {'output':>14} {'params':>13} {'mult-adds':>15}")
    for r in s["layers"]:
        shape = "x".join(map(str, r["output"]))
        print(f"{r['layer']:<10} {shape:>14} {r['params']:>13,} {r['macs']:>15,}")
    print(f"{'total':<10} {'':>14} {s['total_params']:>13,} {s['total_macs']:>15,}")
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        inner = [f"({_fmt(x)})" if isinstance(x, tuple) else _fmt(x) for x in v]
        return ",".join(inner) or "-"
    return str(v)


def run_profiles(args) -> int:
    names = list(PROFILES)
    rows = profile_differences(names)
    if args.json:
        table = {k: dict(zip(names, vs, strict=True)) for k, vs in rows}
        print(json.dumps(table, indent=2, default=str))
        return 0
    cells = [[k] + [_fmt(v) for v in vs] for k, vs in rows]
    header = ["value"] + names
    widths = [max(len(str(r[i])) for r in [header, *cells]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *cells]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print("(-: a value this profile's layout does not read)\n")
    for n in names:
        print(f"{n}: {PROFILES[n].description}")
    print("\nThe paper's variants and ablations, on any two-tower profile (--set model.FIELD=...):")
    for field, what in MODEL_OVERRIDES:
        print(f"  model.{field}: {what}")
    return 0


MODEL_OVERRIDES = (
    ("conv6=true", 'Sec. 6\'s extra sixth conv layer over the last pooling layer ("1 CNN*")'),
    ("towers=1", "Sec. 3.2's one-GPU net, half the kernels in conv1-conv4"),
    ("lrn=false", "no local response normalisation (Sec. 3.3)"),
    ("pool=nonoverlap", "2x2 stride-2 pooling instead of 3x3 stride 2 (Sec. 3.4)"),
    ("drop_conv=3|4|5", "a middle conv layer removed (Sec. 7)"),
    ("activation=tanh", "tanh instead of ReLU (Sec. 3.1, Figure 1)"),
    ("dropout=P, dropout_style=classic|inverted", "dropout of fc6/fc7 (Sec. 4.2)"),
)


def register(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes, parameters and multiply-adds")
    p.add_argument("--profile", default="paper", help=f"one of {', '.join(PROFILES)}")
    p.add_argument("--input", type=int, default=None, help="input side (default: the profile's)")
    p.add_argument(
        "--num-classes", type=int, default=1000, help="classes of the last layer (default 1000)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="model.FIELD=VALUE",
        help="a model override, e.g. --set model.conv6=true (Sec. 6's sixth conv layer) or "
        "--set model.towers=1",
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON (layers, total_params, total_macs)"
    )
    p.set_defaults(handler=run_summary)
    p = sub.add_parser("profiles", help="a table of every value on which the profiles differ")
    p.add_argument("--json", action="store_true", help="print the table as one JSON object")
    p.set_defaults(handler=run_profiles)
