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

A declaration for the study engine (experiments.common): its rows, one run, the paired
deltas; the engine runs, caches, summarises (mean, range, 95% interval over seeds) and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet.config import apply_overrides, get_profile
from alexnet.data import open_store
from alexnet.errors import BadInput
from alexnet.experiments.common import (
    Metric,
    Row,
    Study,
    default_store,
    fit_schedule,
    paired_deltas,
    plot_study,
    read_step_losses,
    run_study,
    study_table,
    summarise_study,
    train_run,
    write_study,
)


def _row(key, label, sets, top1, top5, source):
    note = {"paper_delta_top1": top1, "paper_delta_top5": top5, "source": source}
    return Row(key, label, sets, note)


VARIANTS = (
    _row("baseline", "baseline (the paper's choices)", (), "0", "0", ""),
    # Sec. 3.3: "Response normalization reduces our top-1 and top-5 error rates by 1.4% and 1.2%"
    _row("lrn", "no LRN", ("model.lrn=false",), "+1.4", "+1.2", "Sec. 3.3"),
    # Sec. 3.4: overlapping pooling "reduces the top-1 and top-5 error rates by 0.4% and 0.3%"
    _row(
        "pool",
        "non-overlapping pooling (z=2, s=2)",
        ("model.pool=nonoverlap",),
        "+0.4",
        "+0.3",
        "Sec. 3.4",
    ),  # fmt: skip
    # Sec. 4.1: PCA lighting "reduces the top-1 error rate by over 1%"
    _row("lighting", "no PCA lighting", ("data.lighting_std=0",), "> +1", "n/r", "Sec. 4.1"),
    # Sec. 4.2: "Without dropout, our network exhibits substantial overfitting"
    _row("dropout", "no dropout", ("model.dropout=0",), "overfits", "overfits", "Sec. 4.2"),
    # Sec. 3.2: two GPUs "reduces our top-1 and top-5 error rates by 1.7% and 1.2%" compared
    # with a net with half as many kernels in each conv layer trained on one GPU.
    _row(
        "towers",
        "one tower (half the kernels in conv1-4)",
        ("model.towers=1",),
        "+1.7",
        "+1.2",
        "Sec. 3.2",
    ),  # fmt: skip
    # Sec. 7: "removing any of the middle layers results in a loss of about 2% for the top-1"
    _row("conv3", "without conv3", ("model.drop_conv=3",), "about +2", "n/r", "Sec. 7"),
    _row("conv4", "without conv4", ("model.drop_conv=4",), "about +2", "n/r", "Sec. 7"),
    _row("conv5", "without conv5", ("model.drop_conv=5",), "about +2", "n/r", "Sec. 7"),
)
BY_KEY = {v.key: v for v in VARIANTS}
# The baseline holds the paper's value of every field a row switches off, whatever the base
# recipe (the `demo` recipe trains without dropout, for example): each row then differs from the
# baseline in its one field.
PAPER_CHOICES = (
    "model.lrn=true", "model.pool=overlap", "data.lighting_std=0.1", "model.dropout=0.5",
    "model.towers=2", "model.drop_conv=none",
)  # fmt: skip
METRICS = (
    Metric("val_top1_error", "top-1 err %", 100), Metric("val_top5_error", "top-5 err %", 100),
    Metric("delta_top1", "Δ top-1"), Metric("delta_top5", "Δ top-5"),
    Metric("train_top1_error", "train top-1 err %", 100),
)  # fmt: skip

# Row minus baseline, in points of error, per seed (paired: the same initial weights where the
# shapes agree, the same batches).
DELTAS = paired_deltas(lambda key: "baseline", {"delta_top1": "val_top1_error",
                                                "delta_top5": "val_top5_error"})  # fmt: skip
CONV = ("conv3", "conv4", "conv5")  # `--only conv`

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


def variant_profile(cfg: AblateConfig, variant: Row, n_train: int | None = None):
    """The base recipe with the paper's choices (PAPER_CHOICES), --set, --batch-size and the
    row's override; given the store's
    training-set size, its schedule fitted to the budget (`fit_schedule`)."""
    sets = [*PAPER_CHOICES, *cfg.sets]
    if cfg.batch_size:
        sets.append(f"train.batch_size={cfg.batch_size}")
    profile = apply_overrides(get_profile(cfg.profile), sets + list(variant.sets))
    return profile if n_train is None else fit_schedule(profile, cfg.steps, n_train)


def run_one(cfg: AblateConfig, store: Path, row: Row, seed: int, folder: Path, spec) -> dict:
    """Train one row with one seed; evaluate it on the spread val and training samples."""
    profile = variant_profile(cfg, row, open_store(store).size("train"))
    # The trainer's own end-of-epoch validation (a one-epoch budget ends at its last step and is
    # validated too) on at most 256 images; the table uses the spread sample of --val-limit.
    t = train_run(folder, spec, profile, (("val", cfg.val_limit), ("train", cfg.val_limit)),
                  data=str(store), seed=seed, device=cfg.device, workers=cfg.workers,
                  log_every=max(1, min(20, cfg.steps // 5)), max_steps=cfg.steps,
                  val_limit=min(cfg.val_limit, 256), fast=cfg.fast)  # fmt: skip
    val, train = t["eval"]["val"], t["eval"]["train"]
    _, losses = read_step_losses(folder / "metrics.jsonl")
    # Disk: state.pt (weights + momentum) is only for resuming; weights only for the baseline.
    (folder / "state.pt").unlink(missing_ok=True)
    if not cfg.keep_weights and (row.key != "baseline" or seed != 0):
        (folder / "model.safetensors").unlink(missing_ok=True)
    return {
        "label": row.label, "steps": t["steps"], "batch_size": profile.train.batch_size,
        "images_seen": t["steps"] * profile.train.batch_size,
        "seconds": t["seconds"], "device": t["device"], "fast_mode": t["fast_mode"],
        "val_top1_error": val["top1_error"], "val_top5_error": val["top5_error"],
        "val_loss": val["loss"], "val_images": val["images"],
        "train_top1_error": train["top1_error"], "train_top5_error": train["top5_error"],
        "train_images": train["images"], "last_train_loss": losses[-1] if losses else None,
    }  # fmt: skip


def ablate_study(cfg: AblateConfig, store: Path) -> Study:
    st = open_store(store)
    rows = [BY_KEY[k] for k in ["baseline", *(cfg.only or [v.key for v in VARIANTS[1:]])]]
    for v in rows:  # fail on a bad override before any training
        variant_profile(cfg, v, st.size("train"))
    if cfg.seeds < 1:
        raise BadInput("--seeds must be at least 1")

    def spec(row: Row, seed: int) -> dict[str, Any]:
        # What defines a run: the resolved recipe included (a profile changed since retrains).
        return {"variant": row.key, "sets": list(row.sets), "base_profile": cfg.profile,
                "base_sets": list(cfg.sets), "batch_size": cfg.batch_size, "steps": cfg.steps,
                "val_limit": cfg.val_limit, "fast": cfg.fast, "store": str(store.resolve()),
                "profile": variant_profile(cfg, row, st.size("train")).to_dict()}  # fmt: skip

    return Study("ablate", cfg.out, rows, range(cfg.seeds), dict(steps=cfg.steps,
                 batch_size=cfg.batch_size, val_limit=cfg.val_limit), spec,
                 lambda row, seed, folder, s: run_one(cfg, store, row, seed, folder, s),
                 METRICS, DELTAS, device=cfg.device)  # fmt: skip


def run_ablate(cfg: AblateConfig) -> dict[str, Any]:
    """Runs (or resumes) every row, writes OUT/ablate.{json,md,png}; returns the JSON."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    store = Path(cfg.data) if cfg.data else default_store(cfg.out, cfg.store_limit)
    st = open_store(store)
    if "val" not in st.splits:
        raise BadInput(f"{store}: the store has no 'val' split to measure the error on")
    study = ablate_study(cfg, store)
    results = run_study(study)
    summary = summarise(cfg, summarise_study(study, results), results, st)
    write_study(cfg.out, "ablate", summary, ablate_markdown(summary),
                lambda path: plot_study(summary, METRICS[2:4], path, plot_title(summary),
                                        paper_marks(summary)))  # fmt: skip
    return summary


def summarise(cfg, summary: dict[str, Any], results, store) -> dict[str, Any]:
    """The engine's summary with what the table's caption and caveat say."""
    r0 = results["baseline"][0]
    n_train = store.size("train")
    epochs = r0["images_seen"] / n_train
    chance = 1 - 1 / store.num_classes
    base_top1 = summary["rows"][0]["val_top1_error"]["mean"]
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
    return summary | {
        "experiment": "ablations of Krizhevsky et al. 2012 (Sec. 3.2-3.4, 4.1, 4.2, 7)",
        "store": Path(r0["spec"]["store"]).name,  # no path of the machine in the results
        "store_train_images": n_train, "profile": cfg.profile, "base_sets": list(cfg.sets),
        # The recipe's values as they were for this run (profiles evolve; results must not).
        "baseline_profile": r0["spec"].get("profile"), "batch_size": r0["batch_size"],
        "steps": r0["steps"], "epochs": epochs, "val_images": r0["val_images"],
        "device": r0.get("device"), "fast_mode": r0.get("fast_mode"),
        "chance_top1_error": chance, "caveat": caveat,
    }  # fmt: skip


def ablate_markdown(summary: dict[str, Any]) -> str:
    mode = summary.get("fast_mode") or {}
    precision = f"{mode.get('autocast_dtype') or 'float32'} on {summary.get('device') or 'cpu'}"
    text = (
        f"Ablations on `{summary['store']}` ({summary['store_train_images']} training images), "
        f"profile `{summary['profile']}`, {summary['steps']} steps of batch "
        f"{summary['batch_size']} ({summary['epochs']:.3g} epochs), validation error on "
        f"{summary['val_images']} images (centre view); seeds "
        f"{', '.join(map(str, summary['seeds']))}: mean (min-max) and 95% t-interval over "
        f"seeds; {precision}. Δ = row minus baseline in points of error (paired by seed; "
        "positive: the paper's choice helps). Paper Δ: the paper's reported effect (ImageNet, "
        "90 epochs); n/r = not reported.\n\n"
    )
    base = lambda r, k: "-" if r["key"] == "baseline" else r[k]  # noqa: E731
    text += study_table(summary, METRICS, (
        ("override", lambda r: ", ".join(f"`{s}`" for s in r["sets"]) or "-"),
        ("paper Δ top-1", lambda r: base(r, "paper_delta_top1")),
        ("paper Δ top-5", lambda r: base(r, "paper_delta_top5")),
        ("source", lambda r: r["source"] or "-"),
    ))  # fmt: skip
    return text + f"\n**Caveat.** {summary['caveat']}\n"


def paper_marks(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The paper's numeric deltas ('about +2', '> +1': their number), per metric and row."""
    marks: dict[str, dict[str, float]] = {"delta_top1": {}, "delta_top5": {}}
    for r in summary["rows"][1:]:
        for n in (1, 5):
            try:
                value = float(r[f"paper_delta_top{n}"].replace("about", "").replace(">", ""))
            except ValueError:
                continue
            marks[f"delta_top{n}"][r["key"]] = value
    return marks


def plot_title(summary: dict[str, Any]) -> str:
    return (
        f"Ablations, row minus baseline in points of validation error: {summary['steps']} "
        f"steps of batch {summary['batch_size']} ({summary['epochs']:.2g} epochs), "
        f"{summary['store']} (positive: the paper's choice helps; the paper's deltas are from "
        "90 ImageNet epochs)"
        + ("\nthe baseline is at chance level: these deltas are noise"
           if "near chance" in summary["caveat"] else "")
    )  # fmt: skip
