"""`alexnet finetune`: does pre-training help? (Sec. 6: pre-trained on ImageNet Fall 2011, then
fine-tuned on ILSVRC-2012.)

Fashion-MNIST's classes are split in two halves: the network is pre-trained on the first five
(A: T-shirt/top, Trouser, Pullover, Dress, Coat), then trained on the other five (B: Sandal,
Shirt, Sneaker, Bag, Ankle boot) with a budget of N training images, once from the pre-trained
weights (`train --init`: every layer but fc8 loaded, fc8 initialised afresh since the classes
differ) and once from scratch, with the same recipe, seeds, batches and views. Both are
evaluated on all of B's test images (centre view). Each budget in --budgets is one such pair per
seed: the table and the figure give the test error against the budget.

Recipe: the `demo` profile (the paper's network with the recipe that learns on a CPU in minutes,
README), for both arms and for the pre-training; each run is one epoch of its budget, the demo's
warm-up and linear decay played within it. The pre-training sees --pretrain-images images of A.

Resumable: every finished run leaves OUT/runs/<name>/result.json and is skipped by a rerun.
Writes OUT/finetune.json, finetune.md and finetune.png. A declaration for the study engine
(experiments.common): the rows are the two arms at each budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.config import apply_overrides, check_profile, get_profile
from alexnet.data import open_store, prepare_store
from alexnet.data.sources import FASHION_MNIST_DIR
from alexnet.errors import BadInput
from alexnet.experiments.common import (
    Metric,
    Row,
    Study,
    cached_run,
    markdown_table,
    paired_deltas,
    run_study,
    study_table,
    summarise_study,
    train_run,
    write_study,
)
from alexnet.plots import plt, save_figure

HALF_A = ("0", "1", "2", "3", "4")  # Fashion-MNIST label indices (the pre-training classes)
HALF_B = ("5", "6", "7", "8", "9")  # the fine-tuning classes
QUICK = dict(pretrain_images=640, budgets=(128,), seeds=1, store_limit=1500, val_limit=200)
FULL = dict(pretrain_images=30_000, budgets=(500, 2000, 8000), seeds=2, store_limit=None,
            val_limit=None)  # fmt: skip


@dataclass
class FinetuneConfig:
    out: str = "runs/finetune"
    source: str = FASHION_MNIST_DIR
    profile: str = "demo"
    pretrain_images: int = 30_000
    budgets: tuple[int, ...] = (500, 2000, 8000)
    seeds: int = 2
    store_limit: int | None = None  # images per split of each half's store (quick mode)
    val_limit: int | None = None  # test images of B (None: all)
    init_lr_mult: float = 1.0
    device: str = "auto"
    workers: int | None = None
    fast: bool = True


def _stores(cfg: FinetuneConfig) -> tuple[Path, Path]:
    out = Path(cfg.out)
    paths = []
    for name, classes in (("A", HALF_A), ("B", HALF_B)):
        suffix = f"-{cfg.store_limit}" if cfg.store_limit else ""
        path = out / f"store-{name}{suffix}"
        prepare_store(cfg.source, path, kind="fashion-mnist", classes=list(classes),
                      limit=cfg.store_limit, progress=False, log=lambda *a: None)  # fmt: skip
        paths.append(path)
    return paths[0], paths[1]


def _profile(cfg: FinetuneConfig, images: int, sets: tuple[str, ...] = (), what: str = ""):
    """The recipe for a budget of `images` training images: one epoch of them."""
    p = apply_overrides(get_profile(cfg.profile), list(sets))
    if images < p.train.batch_size:
        what = what or f"a budget of {images} images"
        raise BadInput(f"{what} is less than one batch of {p.train.batch_size}")
    train = dataclasses.replace(p.train, epochs=1, epoch_images=images)
    return dataclasses.replace(p, train=train)


def _run(cfg, store: Path, profile, seed: int, folder: Path, spec, init: str = "") -> dict:
    """Train one run (one epoch of its budget); its test error on all of B (or val_limit)."""
    t = train_run(folder, spec, profile, data=str(store), seed=seed, device=cfg.device,
                  workers=cfg.workers, fast=cfg.fast, val_limit=cfg.val_limit, log_every=10,
                  init=init)  # fmt: skip
    (folder / "state.pt").unlink(missing_ok=True)  # disk: only the weights are kept
    last = t["history"][-1]
    return {"seconds": t["seconds"], "images_seen": t["steps"] * profile.train.batch_size,
            "loaded": t["loaded"]} | {k: last[k] for k in ("val_top1_error", "val_top5_error",
                                                          "val_loss", "val_images")}  # fmt: skip


def _spec(cfg, store: Path, profile, seed: int, init: str) -> dict[str, Any]:
    return {"store": str(store.resolve()), "seed": seed, "init": init, "fast": cfg.fast,
            "val_limit": cfg.val_limit, "profile": profile.to_dict()}  # fmt: skip


METRICS = (
    Metric("val_top1_error", "test top-1 err %", 100, 2),
    Metric("delta", "fine-tuned minus scratch (points)", 1, 2),
)
# Fine-tuned minus scratch per seed, in points: the same seed, batches and views.
DELTAS = paired_deltas(
    lambda key: key.replace("finetuned-", "scratch-") if key.startswith("finetuned-") else None,
    {"delta": "val_top1_error"},
)


def check_finetune_config(cfg: FinetuneConfig) -> tuple[str, ...]:
    """Every value checked before anything is prepared or trained (a budget below one batch,
    or an --init-lr-mult the optimiser cannot apply, used to stop the command only after the
    pre-training); returns the fine-tuned arm's --set overrides."""
    if cfg.seeds < 1 or not cfg.budgets:
        raise BadInput("--seeds must be at least 1 and --budgets name at least one budget")
    sets = (f"train.init_lr_mult={cfg.init_lr_mult}",)
    check_profile(
        _profile(cfg, cfg.pretrain_images, what=f"--pretrain-images {cfg.pretrain_images}")
    )
    for n in cfg.budgets:
        check_profile(_profile(cfg, n, sets))
    return sets


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Runs (or resumes) the pre-training and every pair; writes OUT/finetune.{json,md,png}."""
    sets = check_finetune_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store_a, store_b = _stores(cfg)
    n_b = open_store(store_b).size("train")
    for n in cfg.budgets:
        if n > n_b:
            raise BadInput(f"a budget of {n} images is more than B's {n_b} training images")
    pre_profile = _profile(cfg, cfg.pretrain_images)
    pre_spec = {"name": "pretrain-A", **_spec(cfg, store_a, pre_profile, 0, "")}
    pre = cached_run(out / "runs" / "pretrain-A", pre_spec,
                     lambda f: _run(cfg, store_a, pre_profile, 0, f, pre_spec))  # fmt: skip
    weights = str(out / "runs" / "pretrain-A" / "model.safetensors")
    rows = [Row(f"{arm}-{n}", f"{arm}, {n:,} images", sets if arm == "finetuned" else (),
                {"budget": n, "arm": arm}) for n in cfg.budgets
            for arm in ("scratch", "finetuned")]  # fmt: skip

    def profile(row: Row):
        return _profile(cfg, row.note["budget"], row.sets)

    def spec(row: Row, seed: int) -> dict[str, Any]:
        init = weights if row.note["arm"] == "finetuned" else ""
        return {"name": f"{row.key}-seed{seed}", **_spec(cfg, store_b, profile(row), seed, init)}

    study = Study("finetune", out, rows, range(cfg.seeds), {"budgets": list(cfg.budgets)}, spec,
                  lambda row, seed, folder, s: _run(cfg, store_b, profile(row), seed, folder, s,
                                                    s["init"]),
                  METRICS, DELTAS,
                  device=cfg.device)  # fmt: skip
    results = run_study(study)
    summary = summarise(cfg, pre, results, open_store(store_a), open_store(store_b))
    summary = summarise_study(study, results) | summary
    write_study(out, "finetune", summary, finetune_markdown(summary),
                lambda path: plot_finetune(summary, path))  # fmt: skip
    return summary


def summarise(cfg: FinetuneConfig, pre, results, store_a, store_b) -> dict[str, Any]:
    per_budget = []
    for n in cfg.budgets:
        s = [100 * r["val_top1_error"] for r in results[f"scratch-{n}"]]
        f = [100 * r["val_top1_error"] for r in results[f"finetuned-{n}"]]
        per_budget.append({
            "budget": n,
            "scratch_top1": s,
            "finetuned_top1": f,
            "delta": [b - a for a, b in zip(s, f, strict=True)],  # fine-tuned minus scratch
            "scratch_mean": float(np.mean(s)),
            "finetuned_mean": float(np.mean(f)),
        })  # fmt: skip
    return {
        "experiment": "pre-training on Fashion-MNIST classes 0-4, then training on 5-9 (Sec. 6)",
        "profile": cfg.profile,
        "pretrain_classes": list(store_a.classes),
        "target_classes": list(store_b.classes),
        "pretrain_images": pre["images_seen"],
        "pretrain_val_top1_error": pre["val_top1_error"],
        "layers_loaded": results[f"finetuned-{cfg.budgets[0]}"][0]["loaded"],
        "init_lr_mult": cfg.init_lr_mult,
        "seeds": cfg.seeds,
        "test_images": results[f"scratch-{cfg.budgets[0]}"][0]["val_images"],
        "budgets": per_budget,
    }


def finetune_markdown(s: dict[str, Any]) -> str:
    text = (
        f"Pre-trained on the Fashion-MNIST classes {', '.join(s['pretrain_classes'])} "
        f"({s['pretrain_images']:,} images, recipe `{s['profile']}`; its own test error "
        f"{100 * s['pretrain_val_top1_error']:.1f}%), then trained on "
        f"{', '.join(s['target_classes'])} with N images, from those weights (every layer but "
        f"fc8 loaded, {s['layers_loaded']} tensors; loaded layers' lr x{s['init_lr_mult']:g}) and "
        f"from scratch, {s['seeds']} seed(s); top-1 error on {s['test_images']:,} test images of "
        "the five new classes, centre view.\n\n"
    )
    rows = [
        [f"{b['budget']:,}",
         ", ".join(f"{v:.2f}" for v in b["scratch_top1"]),
         ", ".join(f"{v:.2f}" for v in b["finetuned_top1"]),
         f"{b['scratch_mean']:.2f}", f"{b['finetuned_mean']:.2f}",
         f"{b['finetuned_mean'] - b['scratch_mean']:+.2f}"]
        for b in s["budgets"]
    ]  # fmt: skip
    text += markdown_table(
        ["images (N)", "scratch, per seed (%)", "fine-tuned, per seed (%)", "scratch mean",
         "fine-tuned mean", "fine-tuned minus scratch (points)"], rows,
    )  # fmt: skip
    text += "\n**Over seeds** (mean (min-max), 95% t-interval)\n\n"
    return text + study_table(s, METRICS)


def plot_finetune(s: dict[str, Any], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [b["budget"] for b in s["budgets"]]
    for key, label, style in (("scratch_top1", "from scratch", "o--"),
                              ("finetuned_top1", "pre-trained on classes 0-4", "s-")):  # fmt: skip
        vals = [b[key] for b in s["budgets"]]
        mean = [float(np.mean(v)) for v in vals]
        lo = [m - min(v) for m, v in zip(mean, vals, strict=True)]
        hi = [max(v) - m for m, v in zip(mean, vals, strict=True)]
        ax.errorbar(x, mean, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{n:,}" for n in x])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.set(xlabel="training images of classes 5-9 (N)", ylabel="test top-1 error (%)",
           title=f"Fine-tuning vs from scratch, Fashion-MNIST 5+5 classes\n{s['seeds']} "
           "seed(s), mean; bars: min-max")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
