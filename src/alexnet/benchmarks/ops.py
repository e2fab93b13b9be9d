"""`alexnet bench ops`: where a training step's time goes, per layer and per operator, for the
paper's net and torchvision's, in a plain loop (what a user's own script gets).

- Per layer: each stage of the network timed alone, forward and backward (its input captured
  from a real forward pass, a random gradient for its output), median of the repeats. The
  layers' sum against the whole step shows what is spent between them (loss, optimiser, glue).
- Per operator: torch.profiler's self CPU time of each aten operator over whole training steps
  (forward, float32 cross-entropy, backward, torch.optim.SGD step), as a share of the step.

Nothing here tunes the allocator (alexnet.speed.tune_cpu_allocator): the figures are those of a
plain loop unless the process tuned it before.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from alexnet import fast
from alexnet.model import AlexNet, build_model
from alexnet.speed import FastMode, autocast, prepare_input


def _stages(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The network as (name, module) in forward order: the two-tower net's stages (in its fast
    form, alexnet.fast: an LRN and its pool run as one stage; the stages fusion left as
    nn.Identity are left out), or torchvision's modules."""
    if isinstance(model, AlexNet):
        return [(n, m) for n, m in model.named_children() if not isinstance(m, torch.nn.Identity)]
    seq = [(f"features.{i}", m) for i, m in enumerate(model.features)]
    seq.append(("avgpool", model.avgpool))
    seq.append(("flatten", torch.nn.Flatten()))
    seq += [(f"classifier.{i}", m) for i, m in enumerate(model.classifier)]
    return seq


def _clone(x):
    if isinstance(x, list):
        return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in x]
    return x.detach().clone().requires_grad_(x.is_floating_point())


def _no_grad(x):
    return [t.detach().clone() for t in x] if isinstance(x, list) else x.detach().clone()


def _grads_of(out):
    return [torch.randn_like(t) for t in out] if isinstance(out, list) else torch.randn_like(out)


def layer_times(model, x, mode: FastMode, repeats: int = 5) -> list[dict[str, Any]]:
    """Forward and backward ms of each stage alone (median of `repeats`), on its real input."""
    stages = _stages(model)
    inputs = []
    with torch.no_grad(), autocast(mode, x.device):
        h = x
        for _name, m in stages:
            inputs.append(_clone(h))
            h = m(h)
    rows = []
    for k, ((name, m), inp) in enumerate(zip(stages, inputs, strict=True)):
        fwd, bwd = [], []
        for _ in range(repeats + 1):
            # The first stage's input is the image (no gradient); the others' are activations.
            leaf = _clone(inp) if k else _no_grad(inp)
            # In-place stages (ReLU) must not see their own output again, nor a leaf.
            a = [t.clone() for t in leaf] if isinstance(leaf, list) else leaf.clone()
            t0 = time.perf_counter()
            with autocast(mode, x.device):
                out = m(a)
            t1 = time.perf_counter()
            outs = out if isinstance(out, list) else [out]
            grads = _grads_of(outs)  # made outside the timed backward
            t2 = time.perf_counter()
            if any(o.requires_grad for o in outs):
                torch.autograd.backward(outs, grads)
            t3 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
        rows.append({
            "layer": name,
            "forward_ms": 1000 * statistics.median(fwd[1:]),
            "backward_ms": 1000 * statistics.median(bwd[1:]),
        })  # fmt: skip
    return rows


def _step_fn(model, x, y, mode: FastMode):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step():
        with autocast(mode, x.device):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def op_times(step, steps: int = 3, top: int = 12) -> tuple[float, list[dict[str, Any]]]:
    """(ms per step, the `top` operators by self CPU time: ms per step and share)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t0) / steps
    merged: dict[str, list[float]] = {}  # op -> [calls, self microseconds]
    for e in prof.key_averages():
        # Every kernel torch.compile made for the LRN counts as one operator.
        key = "compiled LRN kernels" if e.key.startswith("## Call CompiledFxGraph") else e.key
        acc = merged.setdefault(key, [0, 0.0])
        acc[0] += e.count
        acc[1] += e.self_cpu_time_total
    total = sum(v[1] for v in merged.values())
    rows = sorted(merged.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return 1000 * wall, [
        {
            "op": key,
            "calls_per_step": calls / steps,
            "self_ms_per_step": us / 1000 / steps,
            "share": us / total if total else 0.0,
        }
        for key, (calls, us) in rows
    ]


def run_ops_bench(
    profiles=("paper", "torchvision"),
    modes=("fp32", "bf16+cl"),
    batches=(64, 128),
    steps: int = 3,
    repeats: int = 5,
    top: int = 12,
    log=print,
) -> dict[str, Any]:
    """Per-layer and per-operator times of every (profile, mode, batch); see the docstring."""
    results = []
    for batch in batches:
        for mode_label in modes:
            mode = FastMode.from_label(mode_label)
            for name in profiles:
                torch.manual_seed(0)
                model = fast.fuse(build_model(name, num_classes=1000).train())
                if mode.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                size = 224 if name == "torchvision" else model.config.input_size
                x = prepare_input(torch.randn(batch, 3, size, size), mode)
                y = torch.randint(0, 1000, (batch,))
                step = _step_fn(model, x, y, mode)
                for _ in range(2):  # warm-up: kernels compiled, caches filled
                    step()
                step_ms, ops = op_times(step, steps, top)
                layers = layer_times(model, x, mode, repeats)
                log(f"bench ops: {name} {mode_label} batch {batch}: {step_ms:.0f} ms per step")
                results.append({
                    "model": name, "mode": mode_label, "batch_size": batch,
                    "step_ms": step_ms, "images_per_s": 1000 * batch / step_ms,
                    "ops": ops, "layers": layers,
                })  # fmt: skip
                del model, step
    return {"results": results, "settings": {"steps": steps, "repeats": repeats, "top": top}}


def format_markdown(result: dict[str, Any], machine_lines: list[str], begin: str, end: str) -> str:
    """The breakdown as a BENCHMARKS.md section."""
    lines = [begin, "## Where the step's time goes (`alexnet bench ops`, plain loop)", ""]
    lines += machine_lines
    lines += [
        "- Per layer: each stage alone, forward + backward on its real input, median of "
        f"{result['settings']['repeats']}; per operator: torch.profiler self CPU time over "
        f"{result['settings']['steps']} whole steps (torch.optim.SGD), no allocator tuning.",
        "",
    ]
    for r in result["results"]:
        lines += [
            f"### {r['model']}, {r['mode']}, batch {r['batch_size']}: {r['step_ms']:.0f} ms per "
            f"step ({r['images_per_s']:.1f} img/s)",
            "",
            "| layer | forward ms | backward ms |",
            "|---|---:|---:|",
        ]
        total_f = sum(x["forward_ms"] for x in r["layers"])
        total_b = sum(x["backward_ms"] for x in r["layers"])
        lines += [
            f"| {x['layer']} | {x['forward_ms']:.1f} | {x['backward_ms']:.1f} |"
            for x in r["layers"]
            if x["forward_ms"] + x["backward_ms"] >= 0.05 * (total_f + total_b) / len(r["layers"])
        ]
        lines += [
            f"| all layers | {total_f:.1f} | {total_b:.1f} |",
            "",
            "| operator | calls per step | self ms per step | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_ms_per_step']:.1f} | "
            f"{100 * o['share']:.1f}% |"
            for o in r["ops"]
        ]
        lines.append("")
    lines.append(end)
    return "\n".join(lines)
