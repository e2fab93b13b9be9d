"""`alexnet ablate`: the paper's ablations, each against the same baseline, same seeds, same
budget.

Every variant is the base recipe (profile `demo` by default: the paper's network with a recipe
that learns on a CPU) with one `--set` override, trained with the same seeds (so the same
initial weights where shapes agree, and the same batches and views) for the same number of
steps, then evaluated on --val-limit validation images spread evenly over the split (centre
view) and, to show overfitting, on as many training images (centre view, no augmentation).

| row | override | the paper |
|---|---|---|
| baseline | (none) | |
| lrn | model.lrn=false | Sec. 3.3: LRN lowers top-1/top-5 error by 1.4/1.2 points |
| pool | model.pool=nonoverlap | Sec. 3.4: z=3,s=2 vs z=2,s=2 lowers them by 0.4/0.3 |
| lighting | data.lighting_std=0 | Sec. 4.1: PCA lighting lowers top-1 by over 1 point |
| dropout | model.dropout=0 | Sec. 4.2: without dropout the net overfits substantially |
| towers | model.towers=1 | Sec. 3.2: two towers beat the one-GPU net by 1.7/1.2 |
| conv3, conv4, conv5 | model.drop_conv=N | Sec. 7: removing a middle conv layer: about +2 top-1 |

The deltas in the table are variant minus baseline, in points of error, per seed (paired, same
seed) then averaged: positive means the paper's choice helped. The paper's deltas come from 90
epochs on 1.2M ImageNet images; a CPU budget of a few hundred steps on Fashion-MNIST resolves
none of them (the seed spread is of the same size or larger), and the table says so. On a GPU
and a real dataset (`--data STORE --steps N`), the same command measures them properly.

Resumable: each finished run leaves OUT/runs/<row>-seed<s>/result.json and is skipped by a
rerun; an interrupted run resumes from its checkpoint (Ctrl-C once: checkpoint and stop).
To keep disk use small, a run's state.pt is deleted once its result is written, and its
model.safetensors too except for the seed-0 baseline's (--keep-weights keeps all).

Why one file of this length: one experiment per file, as the other experiments: its rows,
runs, table and figure.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.config import apply_overrides, get_profile
from alexnet.data import make_eval_loader, open_store, prepare_store
from alexnet.data.sources import FASHION_MNIST_DIR
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_model
from alexnet.experiments.common import markdown_table, progress, read_step_losses, train_or_resume
from alexnet.fileio import read_json, write_json, write_text
from alexnet.plots import plt, save_figure
from alexnet.train import RunConfig


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    sets: tuple[str, ...]
    paper_top1: str  # the paper's variant-minus-baseline, in points of error
    paper_top5: str
    source: str


VARIANTS = (
    Variant("baseline", "baseline (the paper's choices)", (), "0", "0", ""),
    # Sec. 3.3: "Response normalization reduces our top-1 and top-5 error rates by 1.4% and 1.2%"
    Variant("lrn", "no LRN", ("model.lrn=false",), "+1.4", "+1.2", "Sec. 3.3"),
    # Sec. 3.4: overlapping pooling "reduces the top-1 and top-5 error rates by 0.4% and 0.3%"
    Variant(
        "pool",
        "non-overlapping pooling (z=2, s=2)",
        ("model.pool=nonoverlap",),
        "+0.4",
        "+0.3",
        "Sec. 3.4",
    ),
    # Sec. 4.1: PCA lighting "reduces the top-1 error rate by over 1%"
    Variant("lighting", "no PCA lighting", ("data.lighting_std=0",), "> +1", "n/r", "Sec. 4.1"),
    # Sec. 4.2: "Without dropout, our network exhibits substantial overfitting"
    Variant("dropout", "no dropout", ("model.dropout=0",), "overfits", "overfits", "Sec. 4.2"),
    # Sec. 3.2: two GPUs "reduces our top-1 and top-5 error rates by 1.7% and 1.2%" compared
    # with a net with half as many kernels in each conv layer trained on one GPU.
    Variant(
        "towers",
        "one tower (half the kernels in conv1-4)",
        ("model.towers=1",),
        "+1.7",
        "+1.2",
        "Sec. 3.2",
    ),
    # Sec. 7: "removing any of the middle layers results in a loss of about 2% for the top-1"
    Variant("conv3", "without conv3", ("model.drop_conv=3",), "about +2", "n/r", "Sec. 7"),
    Variant("conv4", "without conv4", ("model.drop_conv=4",), "about +2", "n/r", "Sec. 7"),
    Variant("conv5", "without conv5", ("model.drop_conv=5",), "about +2", "n/r", "Sec. 7"),
)
BY_KEY = {v.key: v for v in VARIANTS}
# The baseline holds the paper's value of every field a row switches off, whatever the base
# recipe (the `demo` recipe trains without dropout, for example): each row then differs from the
# baseline in its one field.
PAPER_CHOICES = (
    "model.lrn=true", "model.pool=overlap", "data.lighting_std=0.1", "model.dropout=0.5",
    "model.towers=2", "model.drop_conv=none",
)  # fmt: skip

QUICK = dict(seeds=1, steps=24, batch_size=64, val_limit=320, store_limit=2000)
FULL = dict(seeds=2, steps=2000, batch_size=64, val_limit=10000, store_limit=None)


@dataclass
class AblateConfig:
    out: str = "runs/ablate"
    data: str | None = None
    profile: str = "demo"
    seeds: int = 2
    steps: int = 2000
    batch_size: int | None = None  # None: the profile's
    val_limit: int = 10000
    store_limit: int | None = None  # images per split of the Fashion-MNIST store it prepares
    only: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    device: str = "auto"
    workers: int | None = None
    keep_weights: bool = False
    quick: bool = False
    fast: bool = True  # speed.py's fastest mode (bf16 autocast where the CPU has it)


def parse_only(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    keys = []
    for k in (t.strip() for t in text.split(",")):
        if not k:
            continue
        if k == "conv":
            keys += ["conv3", "conv4", "conv5"]
        elif k in BY_KEY:
            keys.append(k)
        else:
            raise BadInput(
                f"--only {k!r}: valid rows are {', '.join(v.key for v in VARIANTS[1:])} "
                "(and conv = conv3,conv4,conv5)"
            )
    return tuple(dict.fromkeys(keys))


def default_store(out: str | Path, limit: int | None = None) -> Path:
    """Prepare Fashion-MNIST (the embedded dataset) into OUT, through `alexnet prepare`."""
    name = "store-fashion-mnist" + (f"-{limit}" if limit else "")
    store = Path(out) / name
    if not (store / "manifest.json").exists():
        print(f"==> preparing Fashion-MNIST into {store}", file=sys.stderr, flush=True)
        prepare_store(FASHION_MNIST_DIR, store, kind="fashion-mnist", limit=limit)
    return store


def variant_profile(cfg: AblateConfig, variant: Variant, n_train: int | None = None):
    """The base recipe with the paper's choices (PAPER_CHOICES), --set, --batch-size and the
    row's override; given the store's
    training-set size, its schedule fitted to the budget (`fit_schedule`)."""
    sets = [*PAPER_CHOICES, *cfg.sets]
    if cfg.batch_size:
        sets.append(f"train.batch_size={cfg.batch_size}")
    profile = apply_overrides(get_profile(cfg.profile), sets + list(variant.sets))
    return profile if n_train is None else fit_schedule(profile, cfg.steps, n_train)


def fit_schedule(profile, steps: int, n_train: int):
    """The recipe's whole schedule (warm-up, decay, milestones) played within `steps` steps:
    one epoch of steps x batch images when the training split holds that many (the recipe's
    epoch_images budget), else as many full epochs as the steps need. Without this a short run
    would stop early in a schedule meant for a longer one (e.g. still warming up)."""
    b = profile.train.batch_size
    per_epoch = n_train // b
    if per_epoch < 1:
        raise BadInput(f"the training split has {n_train} images, fewer than a batch of {b}")
    if steps <= per_epoch:
        train = dataclasses.replace(profile.train, epochs=1, epoch_images=steps * b)
    else:
        train = dataclasses.replace(profile.train, epochs=-(-steps // per_epoch), epoch_images=None)
    return dataclasses.replace(profile, train=train)


def run_spec(
    cfg: AblateConfig, variant: Variant, seed: int, store: Path, profile
) -> dict[str, Any]:
    """What defines a run: a cached result is reused only if this matches exactly (the
    resolved recipe included: a profile that changed since is trained again)."""
    spec = {
        "variant": variant.key,
        "sets": list(variant.sets),
        "base_profile": cfg.profile,
        "base_sets": list(cfg.sets),
        "batch_size": cfg.batch_size,
        "seed": seed,
        "steps": cfg.steps,
        "val_limit": cfg.val_limit,
        "fast": cfg.fast,
        "store": str(store.resolve()),
        "profile": profile.to_dict(),
    }
    return json.loads(json.dumps(spec))  # as it reads back from JSON (tuples become lists)


def _evaluate(trainer, split: str, limit: int, batch_size: int = 32) -> dict[str, Any]:
    """Top-1/top-5 error of the trained net on `limit` images spread over `split` (centre view,
    Sec. 4.1, the store's statistics), through the evaluation loader and evaluate_model."""
    # The run's loader workers and decoding: on a GPU machine 2 x 10,000 images decoded in this
    # process alone took longer than the run's training.
    loader = make_eval_loader(
        trainer.store, trainer.profile.data, batch_size, split=split, workers=trainer.run.workers,
        device=trainer.device, limit=limit, decode=trainer.train_loader.decode,
    )  # fmt: skip
    try:
        return evaluate_model(trainer.model, loader, views=1, mode=trainer.mode,
                              device=trainer.device)  # fmt: skip
    finally:
        loader.close()


def train_one(cfg: AblateConfig, variant: Variant, seed: int, store: Path) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; returns its result (also in result.json)."""
    folder = Path(cfg.out) / "runs" / f"{variant.key}-seed{seed}"
    profile = variant_profile(cfg, variant, open_store(store).size("train"))
    spec = run_spec(cfg, variant, seed, store, profile)
    done = read_json(folder / "result.json")
    if done is not None and done.get("spec") == spec:
        return done
    run = RunConfig(
        data=str(store),
        out=str(folder),
        seed=seed,
        device=cfg.device,
        workers=cfg.workers,
        log_every=max(1, min(20, cfg.steps // 5)),
        max_steps=cfg.steps,
        # The trainer's own end-of-epoch validation (a one-epoch budget ends at its last step
        # and is validated too); the table uses _evaluate's spread sample.
        val_limit=min(cfg.val_limit, 256),
        fast=cfg.fast,
    )
    t0 = time.perf_counter()
    trainer = train_or_resume(folder, spec, profile, run)
    seconds = time.perf_counter() - t0
    val = _evaluate(trainer, "val", cfg.val_limit)
    train = _evaluate(trainer, "train", cfg.val_limit)
    _, losses = read_step_losses(folder / "metrics.jsonl")
    result = {
        "spec": spec,
        "label": variant.label,
        "steps": trainer.pos.step,
        "images_seen": trainer.pos.step * profile.train.batch_size,
        "batch_size": profile.train.batch_size,
        "seconds": seconds,
        "device": str(trainer.device),
        "fast_mode": dataclasses.asdict(trainer.mode),
        "val_top1_error": val["top1_error"],
        "val_top5_error": val["top5_error"],
        "val_loss": val["loss"],
        "val_images": val["images"],
        "train_top1_error": train["top1_error"],
        "train_top5_error": train["top5_error"],
        "train_images": train["images"],
        "last_train_loss": losses[-1] if losses else None,
    }
    write_json(folder / "result.json", result)
    # Disk: state.pt (weights + momentum) is only for resuming; weights only for the baseline.
    (folder / "state.pt").unlink(missing_ok=True)
    if not cfg.keep_weights and (variant.key != "baseline" or seed != 0):
        (folder / "model.safetensors").unlink(missing_ok=True)
    return result


def run_ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Runs (or resumes) every row, writes OUT/ablate.{json,md,png}; returns the JSON."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(cfg.data) if cfg.data else default_store(cfg.out, cfg.store_limit)
    st = open_store(store)
    if "val" not in st.splits:
        raise BadInput(f"{store}: the store has no 'val' split to measure the error on")
    keys = ["baseline", *[k for k in (cfg.only or [v.key for v in VARIANTS[1:]])]]
    variants = [BY_KEY[k] for k in keys]
    for v in variants:  # fail on a bad override before any training
        variant_profile(cfg, v, st.size("train"))
    seeds = list(range(cfg.seeds))
    if not seeds:
        raise BadInput("--seeds must be at least 1")
    results: dict[str, list[dict[str, Any]]] = {v.key: [] for v in variants}
    bar = progress(len(variants) * len(seeds), "ablate", unit="run")
    for seed in seeds:  # seed-major: a stopped ablation has every row for its first seeds
        for v in variants:
            bar.set_postfix_str(f"{v.key} seed {seed}")
            results[v.key].append(train_one(cfg, v, seed, store))
            bar.update(1)
    bar.close()
    summary = summarise(cfg, variants, results, st)
    write_json(out / "ablate.json", summary)
    write_text(out / "ablate.md", ablate_markdown(summary))
    plot_ablate(summary, out / "ablate.png")
    return summary


def _mean_spread(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def summarise(cfg, variants, results, store) -> dict[str, Any]:
    base = results["baseline"]
    rows = []
    for v in variants:
        rs = results[v.key]
        row = {
            "key": v.key,
            "label": v.label,
            "sets": list(v.sets),
            "source": v.source,
            "paper_delta_top1": v.paper_top1,
            "paper_delta_top5": v.paper_top5,
            "per_seed": [
                {
                    k: r[k]
                    for k in ("val_top1_error", "val_top5_error", "train_top1_error", "seconds")
                }
                | {"seed": r["spec"]["seed"]}
                for r in rs
            ],
        }
        for m in ("val_top1_error", "val_top5_error", "train_top1_error"):
            row[m] = _mean_spread([r[m] for r in rs])
        for m, name in (("val_top1_error", "delta_top1"), ("val_top5_error", "delta_top5")):
            # Paired by seed: the same initial weights (where shapes agree) and the same batches.
            row[name] = _mean_spread([100 * (r[m] - b[m]) for r, b in zip(rs, base, strict=True)])
        row["overfit_gap"] = _mean_spread(
            [100 * (r["val_top1_error"] - r["train_top1_error"]) for r in rs]
        )
        rows.append(row)
    r0 = base[0]
    n_train = store.size("train")
    epochs = r0["images_seen"] / n_train
    chance = 1 - 1 / store.num_classes
    base_top1 = float(np.mean([r["val_top1_error"] for r in base]))
    caveat = (
        f"Each run trained {r0['steps']} steps of batch {r0['batch_size']} "
        f"({epochs:.3g} epochs of {n_train} images). The paper's deltas (0.3-2 points) come "
        "from 90 epochs on ImageNet; at this budget they are not resolvable: compare each "
        "delta with the seed spread of the baseline and of the row."
    )
    if base_top1 > chance - 0.5 * (1 - chance):
        caveat += (
            f" Here the baseline's top-1 error ({100 * base_top1:.1f}%) is near chance "
            f"({100 * chance:.1f}% for {store.num_classes} classes): the nets have not started "
            "to learn, and every delta is noise."
        )
    return {
        "experiment": "ablations of Krizhevsky et al. 2012 (Sec. 3.2-3.4, 4.1, 4.2, 7)",
        "store": Path(r0["spec"]["store"]).name,  # no path of the machine in the results
        "store_train_images": n_train,
        "profile": cfg.profile,
        "base_sets": list(cfg.sets),
        # The recipe's values as they were for this run (profiles evolve; results must not).
        "baseline_profile": r0["spec"].get("profile"),
        "batch_size": r0["batch_size"],
        "steps": r0["steps"],
        "epochs": epochs,
        "seeds": [r["spec"]["seed"] for r in base],
        "val_images": r0["val_images"],
        "device": r0.get("device"),
        "fast_mode": r0.get("fast_mode"),
        "rows": rows,
        "chance_top1_error": chance,
        "caveat": caveat,
    }


def _pm(s: dict[str, float], n: int, digits: int = 1, scale: float = 100) -> str:
    if n > 1:
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f}"


def _precision(summary: dict[str, Any]) -> str:
    mode = summary.get("fast_mode") or {}
    dtype = mode.get("autocast_dtype") or "float32"
    return f"{dtype} on {summary.get('device') or 'cpu'}"


def ablate_markdown(summary: dict[str, Any]) -> str:
    n = len(summary["seeds"])
    header = [
        "row",
        "override",
        "top-1 err %",
        "top-5 err %",
        "Δ top-1",
        "Δ top-5",
        "paper Δ top-1",
        "paper Δ top-5",
        "train top-1 err %",
        "source",
    ]
    rows = []
    for r in summary["rows"]:
        rows.append(
            [
                r["label"],
                ", ".join(f"`{s}`" for s in r["sets"]) or "-",
                _pm(r["val_top1_error"], n),
                _pm(r["val_top5_error"], n),
                "-"
                if r["key"] == "baseline"
                else f"{r['delta_top1']['mean']:+.1f}"
                + (f" ± {r['delta_top1']['std']:.1f}" if n > 1 else ""),
                "-"
                if r["key"] == "baseline"
                else f"{r['delta_top5']['mean']:+.1f}"
                + (f" ± {r['delta_top5']['std']:.1f}" if n > 1 else ""),
                "-" if r["key"] == "baseline" else r["paper_delta_top1"],
                "-" if r["key"] == "baseline" else r["paper_delta_top5"],
                _pm(r["train_top1_error"], n),
                r["source"] or "-",
            ]
        )
    spread = (
        "mean ± s.d. over seeds " + ", ".join(map(str, summary["seeds"]))
        if n > 1
        else (f"one seed ({summary['seeds'][0]}): no spread measured")
    )
    text = (
        f"Ablations on `{summary['store']}` ({summary['store_train_images']} training images), "
        f"profile `{summary['profile']}`, {summary['steps']} steps of batch "
        f"{summary['batch_size']} ({summary['epochs']:.3g} epochs), validation error on "
        f"{summary['val_images']} images (centre view); {spread}; {_precision(summary)}. "
        "Δ = row minus baseline in "
        "points of error (paired by seed; positive: the paper's choice helps). Paper Δ: the "
        "paper's reported effect (ImageNet, 90 epochs); n/r = not reported.\n\n"
    )
    text += markdown_table(header, rows)
    text += f"\n**Caveat.** {summary['caveat']}\n"
    return text


def plot_ablate(summary: dict[str, Any], path: str | Path) -> Path:
    rows = [r for r in summary["rows"] if r["key"] != "baseline"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(rows))
    for off, key, label in (
        (-0.2, "delta_top1", "Δ top-1 (ours)"),
        (0.2, "delta_top5", "Δ top-5 (ours)"),
    ):
        mean = [r[key]["mean"] for r in rows]
        lo = [r[key]["mean"] - r[key]["min"] for r in rows]
        hi = [r[key]["max"] - r[key]["mean"] for r in rows]
        ax.bar(x + off, mean, 0.38, yerr=[lo, hi], capsize=3, label=label + ", min-max bars")
    for i, r in enumerate(rows):  # the paper's numeric deltas as markers
        for off, key, m in ((-0.2, "paper_delta_top1", "k*"), (0.2, "paper_delta_top5", "kx")):
            try:
                val = float(r[key].replace("about", "").replace(">", "").strip())
            except ValueError:
                continue
            ax.plot(i + off, val, m, ms=8, label=None)
    ax.plot([], [], "k*", label="paper Δ top-1")
    ax.plot([], [], "kx", label="paper Δ top-5")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [r["label"].split(" (")[0] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("validation error: row minus baseline (points)")
    ax.set_title(
        f"Ablations: {summary['steps']} steps of batch {summary['batch_size']} "
        f"({summary['epochs']:.2g} epochs), {len(summary['seeds'])} seed(s), "
        f"{Path(summary['store']).name}\n(positive: the paper's choice helps; the paper's "
        "deltas are from 90 ImageNet epochs)"
        + (
            "\nthe baseline is at chance level: these deltas are noise"
            if "near chance" in summary["caveat"]
            else ""
        ),
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)
