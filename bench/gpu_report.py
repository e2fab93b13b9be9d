"""bench/gpu.sh's report: every step's outcome and the key figures, from the files the steps
left in the work folder, written as OUT/summary.md and OUT/results.json (after every step, so
that a run cut short still brings back what it did) and printed last.

    python3 bench/gpu_report.py WORK OUT [--print]

The standard library only: it runs even where torch does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The targets for the end-to-end loop on one H200.
GOAL_IMAGES_PER_S, GOAL_RATIO, GOAL_BUSY = 20000, 5.0, 90.0

# results.json's keys: the JSON file each step leaves in WORK.
FILES = {
    "checks": "checks.json",
    "bench_model": "bench-model.json",
    "bench_convs": "bench-convs.json",
    "bench_e2e": "bench-e2e.json",
    "bench_model_compile": "bench-model-compile.json",
    "recipes": "recipes/recipes.json",
    "ablate": "ablate/ablate.json",
}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(work: Path) -> list[dict]:
    rows = []
    try:
        lines = (work / "steps.tsv").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 4:
            rows.append({"step": parts[0], "budget_s": parts[1], "seconds": parts[2],
                         "status": parts[3]})  # fmt: skip
    return rows


def _checks(r) -> list[str]:
    checks = r.get("checks", {})
    bad = [k for k, v in checks.items() if not v["ok"]]
    ok = len(checks) - len(bad)
    lines = [f"- CUDA checks on {r.get('device')}: **{ok}/{len(checks)} passed**"]
    lines += [f"  - FAILED {k}: {checks[k]['error']}" for k in bad]
    return lines


def _model(r, title: str) -> list[str]:
    rows = {(x["model"], x["mode"]): x for x in r.get("rows", [])}
    lines = [f"- {title} (batch {r['settings']['batch_size']}), training images/s:"]
    modes = list(dict.fromkeys(m for _, m in rows))
    lines.append("  | model | " + " | ".join(modes) + " |")
    lines.append("  |---|" + "---:|" * len(modes))
    for model in dict.fromkeys(m for m, _ in rows):
        cells = [f"{rows[model, m]['train_images_per_s']:.0f}" if (model, m) in rows else "-"
                 for m in modes]  # fmt: skip
        lines.append(f"  | {model} | " + " | ".join(cells) + " |")
    ratios = r.get("ratios", {})
    for key in ("fastest_vs_torchvision_fp32", "paper_fp32_vs_torchvision_fp32"):
        if key in ratios:
            lines.append(f"  - {key}: {ratios[key]:.2f}x")
    return lines


def _convs(r) -> list[str]:
    return ["- conv2 time, grouped / two dense: " + ", ".join(
        f"{k.removeprefix('conv2_grouped_over_two_dense_')} {v:.2f}"
        for k, v in r.get("ratios", {}).items())]  # fmt: skip


def _e2e(r) -> list[str]:
    lines = [f"- End to end (batch {r['settings']['batch_size']}):"]
    best, best_busy = 0.0, None
    for x in r["rows"]:
        busy = "n/a" if x["gpu_busy_percent"] is None else f"{x['gpu_busy_percent']:.0f}%"
        lines.append(f"  - {x['loop']} (decode {x['decode']}, {x['mode']}): "
                     f"{x['images_per_s']:.0f} images/s, GPU busy {busy}")  # fmt: skip
        if x["loop"] == "ours" and x["images_per_s"] > best:
            best, best_busy = x["images_per_s"], x["gpu_busy_percent"]
    ratio = r["ratio_best"]

    def mark(ok):
        return "met" if ok else "NOT met"

    lines.append(
        f"  - goals: >= {GOAL_IMAGES_PER_S} images/s {mark(best >= GOAL_IMAGES_PER_S)} "
        f"({best:.0f}); >= {GOAL_RATIO:g}x the reference {mark(ratio >= GOAL_RATIO)} "
        f"({ratio:.2f}x); GPU busy > {GOAL_BUSY:g}% "
        f"{mark(best_busy is not None and best_busy > GOAL_BUSY)} ({best_busy})"
    )
    if r.get("decode_auto"):
        a = r["decode_auto"]
        lines.append(f"  - decode auto chose {a['decode']} (GPU {a['gpu_images_per_s']:.0f} vs "
                     f"workers <= {a['cpu_images_per_s']:.0f} images/s)")  # fmt: skip
    return lines


def _recipes(r) -> list[str]:
    lines = ["- Recipes (validation top-1 error % per epoch):"]
    for name, x in r.get("recipes", {}).items():
        errs = ", ".join(f"{100 * e['val_top1_error']:.1f}" for e in x["epochs"]
                         if e.get("val_top1_error") is not None)  # fmt: skip
        lines.append(f"  - {name}: {errs or 'no epoch finished'}; leaves chance at step "
                     f"{x.get('leave_chance_step')}")  # fmt: skip
    return lines


def _ablate(r) -> list[str]:
    lines = [f"- Ablations ({r.get('profile')}, {r.get('epochs', 0):.3g} epochs, seeds "
             f"{r.get('seeds')}), top-1 error delta vs baseline, points:"]  # fmt: skip
    for row in r.get("rows", []):
        d = row.get("delta_top1", {})
        lines.append(f"  - {row['key']}: {d.get('mean', 0):+.2f} ± {d.get('std', 0):.2f} "
                     f"(paper {row.get('paper_delta_top1')})")  # fmt: skip
    return lines


def build(work: Path) -> tuple[str, dict]:
    results = {"steps": _steps(work)}
    for key, name in FILES.items():
        results[key] = _load(work / name)
    machine = (work / "machine.txt").read_text() if (work / "machine.txt").exists() else ""
    lines = ["# bench/gpu.sh", "", "| step | status | seconds | budget |", "|---|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['budget_s']} |"
              for s in results["steps"]]  # fmt: skip
    lines += ["", *(f"    {m}" for m in machine.strip().splitlines()[:4]), ""]
    parts = (
        ("checks", _checks, ()),
        ("bench_model", _model, ("bench model",)),
        ("bench_model_compile", _model, ("bench model with torch.compile",)),
        ("bench_convs", _convs, ()),
        ("bench_e2e", _e2e, ()),
        ("recipes", _recipes, ()),
        ("ablate", _ablate, ()),
    )
    for key, fn, extra in parts:
        if results[key] is None:
            lines.append(f"- {key}: no result")
            continue
        try:
            lines += fn(results[key], *extra)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            lines.append(f"- {key}: unreadable result ({type(e).__name__}: {e})")
    return "\n".join(lines) + "\n", results


def main(argv: list[str]) -> int:
    work, out = Path(argv[0]), Path(argv[1])
    text, results = build(work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if "--print" in argv:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
