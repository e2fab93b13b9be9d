"""`alexnet figure1`: Figure 1 of the paper, ReLU versus tanh.

The paper (Sec. 3.1, Figure 1): "A four-layer convolutional neural network with ReLUs (solid
line) reaches a 25% training error rate on CIFAR-10 six times faster than an equivalent network
with tanh neurons (dashed line). The learning rates for each network were chosen independently
to make training as fast as possible. No regularization of any kind was employed."

The nets: --net four (default), cuda-convnet's small CIFAR-10 net (layers-80sec.cfg, the 2011
code the paper's Figure 1 came from) without its 64-unit fully connected layer, to match the
caption's four layers, PyTorch's default init, inputs minus the mean image over their std; or
--net layers-80sec, the 2012 file's five-layer net as it is, its init, raw pixels minus the
mean. No regularisation of any kind. ReLU and tanh start from the same weights and see the same
batches; only the activation and the learning rate differ. Plain SGD with momentum 0.9, batch
128 (Sec. 5). The training error is the 2012 code's: the error of the net's predictions on the
batches it trains on, averaged over windows of 1/P epoch (P = --points-per-epoch). The nets and
their loop: alexnet.experiments.cifar_nets.

"Epochs to threshold" is the end of the first window whose training error is at most the
threshold (default 0.25, the paper's); "seconds" is the training wall time up to that point.

Learning rates: each activation gets the rate from --lr-grid whose seed-0 run has the lowest
mean training error over the run (the area under its curve: the fastest learner over the whole
budget; a single threshold crossing of a noisy curve is a worse criterion), the paper's "chosen
independently to make training as fast as possible"; or fixed values with --lr-relu /
--lr-tanh. The seed-0 run of the chosen rate is reused, not rerun.

The ratio is tanh's mean epochs (seconds) to the threshold over ReLU's. When some seeds of one
net never reach the threshold, their budget stands in for the missing value and the ratio is a
bound: "at least" if tanh fell short, "at most" if ReLU did (none if both did).

Data: CIFAR-10 from its python batches (--data DIR) or, by default, Fashion-MNIST read from the
IDX files (28x28 grey images zero-padded to 32x32). On Fashion-MNIST both nets pass 25% training
error within the first epoch, so the ratio is measured at sub-epoch resolution; --threshold
changes the target.

Every finished run is cached in OUT/runs/<run>/result.json (keyed by everything that defines
it): an interrupted figure1 resumes where it stopped and a rerun only redraws the figure. The
seed runs are a study of the engine (experiments.common: rows ReLU and tanh x seeds), which
adds the 95% interval over seeds and the provenance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data.sources import FASHION_MNIST_DIR, load_cifar10
from alexnet.errors import BadInput
from alexnet.experiments.cifar_nets import (
    ACTIVATIONS,
    NETS,
    RunSpec,
    load_fashion_mnist,
    normalise,
    train_run,
)
from alexnet.experiments.common import (
    Metric,
    Row,
    Study,
    cached_run,
    markdown_table,
    progress,
    run_study,
    seed_stats,
    study_table,
    summarise_study,
    write_study,
)
from alexnet.plots import plt, save_figure
from alexnet.speed import FastMode, default_fast_mode

PAPER_RATIO = 6.0  # Figure 1: ReLU reaches 25% training error six times faster on CIFAR-10
PAPER_THRESHOLD = 0.25  # Figure 1: "reaches a 25% training error rate"

# Learning-rate grids searched per activation (seed 0). Quick: three rates a factor ~3 apart.
QUICK_LR_GRID = (0.01, 0.03, 0.1)
FULL_LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
QUICK = dict(epochs=3, seeds=2, train_images=4000, points_per_epoch=8, search_epochs=None,
             threshold_epoch=None)  # fmt: skip
# Full: the lr search over 10 epochs, then 3 seeds of 30 epochs; the threshold is what the ReLU
# net reaches at epoch 5 (on Fashion-MNIST the paper's 25% falls within the first epoch).
FULL = dict(epochs=30, seeds=3, train_images=None, points_per_epoch=5, search_epochs=10,
            threshold_epoch=5.0)  # fmt: skip


def first_crossing(xs: list[float], errors: list[float | None], threshold: float) -> float | None:
    """The first x at which the error is at most the threshold (None: never)."""
    for x, e in zip(xs, errors, strict=True):
        if e is not None and e <= threshold:
            return x
    return None


def _score(run: dict[str, Any], threshold: float) -> tuple[float, float]:
    """Lower is faster: (mean training error over the run, epochs to threshold or inf);
    a diverged run: inf."""
    if run["diverged"] or not run["errors"]:
        return (math.inf, math.inf)
    reach = first_crossing(run["epochs"], run["errors"], threshold)
    return (float(np.mean(run["errors"])), math.inf if reach is None else reach)


# --- the experiment --------------------------------------------------------------------------
@dataclass
class Figure1Config:
    out: str = "runs/figure1"
    data: str | None = None  # CIFAR-10 python batches; None: Fashion-MNIST
    fashion_mnist: str = FASHION_MNIST_DIR
    seeds: int = 3
    epochs: int = 30
    # The target training error: a number, or None with threshold_epoch: the error the chosen
    # ReLU net (seed 0) has after threshold_epoch epochs, so ReLU needs that long to reach it.
    threshold: float | None = PAPER_THRESHOLD
    threshold_epoch: float | None = None
    search_epochs: int | None = None  # epochs of the lr-search runs (None: `epochs`)
    fast: bool = True  # speed.default_fast_mode (bf16 autocast + channels_last on such CPUs)
    batch_size: int = 128  # Sec. 5
    train_images: int | None = None  # a subset of the training set (None: all of it)
    points_per_epoch: int = 5
    lr_grid: tuple[float, ...] = FULL_LR_GRID
    lr: dict[str, float | None] = field(default_factory=lambda: {"relu": None, "tanh": None})
    device: str = "cpu"
    quiet: bool = False
    net: str = "four"  # a key of NETS: four (default), layers-80sec (the 2012 file's net)


def load_dataset(cfg: Figure1Config) -> tuple[str, str, np.ndarray, np.ndarray]:
    if cfg.data:
        images, labels = load_cifar10(cfg.data)
        return "cifar10", "CIFAR-10 (32x32 colour)", images, labels
    images, labels = load_fashion_mnist(cfg.fashion_mnist)
    return "fashion-mnist", "Fashion-MNIST (28x28 grey, padded to 32x32)", images, labels


def run_figure1(cfg: Figure1Config) -> dict[str, Any]:
    """Runs (or resumes) the experiment, writes OUT/figure1.{png,json,md}; returns the JSON."""
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if cfg.net not in NETS:
        raise BadInput(f"--net {cfg.net!r}: one of {', '.join(NETS)}")
    dataset, title, images, labels = load_dataset(cfg)
    if cfg.train_images is not None:
        if cfg.train_images < cfg.batch_size:
            raise BadInput(f"--train-images {cfg.train_images} is below one batch")
        # A fixed class-balanced-in-expectation subset: the first N of one seeded permutation.
        pick = np.random.default_rng(0).permutation(len(labels))[: cfg.train_images]
        images, labels = images[np.sort(pick)], labels[np.sort(pick)]
    x, y = normalise(images, by_std=NETS[cfg.net][1]), torch.from_numpy(labels)
    if cfg.seeds < 1:
        raise BadInput("--seeds must be at least 1")
    mode = (default_fast_mode(cfg.device) if cfg.fast else FastMode()).label
    search_epochs = cfg.search_epochs or cfg.epochs
    if search_epochs > cfg.epochs:
        raise BadInput(f"--search-epochs {search_epochs} is more than --epochs {cfg.epochs}")
    if (cfg.threshold is None) == (cfg.threshold_epoch is None):
        raise BadInput("give a threshold, or the epoch at which the ReLU net sets it, not both")

    def spec(act: str, lr: float, seed: int, epochs: int | None = None) -> RunSpec:
        return RunSpec(dataset, len(y), act, float(lr), seed, epochs or cfg.epochs,
                       cfg.batch_size, cfg.points_per_epoch, mode=mode, net=cfg.net)  # fmt: skip

    def get(s: RunSpec) -> dict[str, Any]:  # as the engine runs it: the same cache key
        key = {"row": s.activation, "seed": s.seed, **asdict(s)}
        return cached_run(out / "runs" / s.name(), key, lambda _: train_run(s, x, y, cfg.device))

    # Each activation's rate: the grid's seed-0 run with the lowest mean training error.
    chosen = {a: cfg.lr[a] for a in ACTIVATIONS if cfg.lr[a] is not None}
    todo = [(a, lr) for a in ACTIVATIONS if a not in chosen for lr in cfg.lr_grid]
    search: dict[str, list] = {a: [] for a, _ in todo}
    for a, lr in progress(todo, desc="figure1 lr search", unit="run", disable=cfg.quiet or None):
        search[a].append((lr, get(spec(a, lr, 0, search_epochs))))
    for act, runs in search.items():
        chosen[act] = min(runs, key=lambda lr_run: _score(lr_run[1], PAPER_THRESHOLD))[0]
    rows = [Row(a, "ReLU" if a == "relu" else "tanh", note={"lr": chosen[a]}) for a in ACTIVATIONS]
    study = Study("figure1", out, rows, range(cfg.seeds), {"epochs": cfg.epochs},
                  lambda row, seed: asdict(spec(row.key, chosen[row.key], seed)),
                  lambda row, seed, _, key: train_run(spec(row.key, chosen[row.key], seed), x, y,
                                                      cfg.device),
                  METRICS, folder=lambda row, seed: spec(row.key, chosen[row.key], seed).name(),
                  device=cfg.device)  # fmt: skip
    results = run_study(study)
    threshold, rule = cfg.threshold, "given"
    if threshold is None:
        # The chosen ReLU net's own training error after threshold_epoch epochs (seed 0): the
        # target it needs that many epochs to reach.
        relu0 = results["relu"][0]
        at = [e for x, e in zip(relu0["epochs"], relu0["errors"], strict=True)
              if abs(x - cfg.threshold_epoch) < 1e-9]  # fmt: skip
        if not at or at[0] is None:
            raise BadInput(f"the ReLU run has no training error at epoch {cfg.threshold_epoch}")
        threshold = float(at[0])
        rule = (
            f"the training error of the ReLU net (lr {chosen['relu']:g}, seed 0) at epoch "
            f"{cfg.threshold_epoch:g}"
        )
    cfg = dataclasses.replace(cfg, threshold=threshold)
    study.derive = lambda res: {a: to_threshold(rs, threshold) for a, rs in res.items()}
    tuning: dict[str, Any] = {a: f"fixed (--lr-{a})" for a in ACTIVATIONS if a not in search}
    for act, runs in search.items():  # with the threshold the JSON records (the final one)
        tuning[act] = [{"lr": lr, "epochs_to_threshold": to_threshold([r], threshold)["epochs"][0],
                        "mean_train_error": None if r["diverged"] or not r["errors"]
                        else float(np.mean(r["errors"])), "diverged": r["diverged"]}
                       for lr, r in runs]  # fmt: skip
    result = summarise_study(study, results) | summarise(
        cfg, dataset, title, len(y), chosen, tuning, results
    )
    result |= {"threshold_rule": rule, "search_epochs": search_epochs, "mode": mode}
    write_study(out, "figure1", result, figure1_markdown(result),
                lambda path: plot_figure1(result, path))  # fmt: skip
    return result


METRICS = (
    Metric("epochs", "epochs to threshold", digits=3),
    Metric("seconds", "seconds to threshold", digits=1),
    Metric("final_error", "final training error %", 100),
)  # fmt: skip


def to_threshold(runs: list[dict[str, Any]], threshold: float) -> dict[str, list]:
    """Per run: epochs and seconds to the threshold (None: never), the last training error."""
    return {
        "epochs": [first_crossing(r["epochs"], r["errors"], threshold) for r in runs],
        "seconds": [first_crossing(r["seconds"], r["errors"], threshold) for r in runs],
        "final_error": [r["errors"][-1] if r["errors"] else None for r in runs],
    }


def summarise(cfg, dataset, title, n_train, chosen, tuning, per_act) -> dict[str, Any]:
    curves, reach = {}, {}
    for act, rs in per_act.items():
        curves[act] = {
            "lr": chosen[act],
            "epochs": rs[0]["epochs"]
            if not any(r["diverged"] for r in rs)
            else max((r["epochs"] for r in rs), key=len),
            "train_error": {str(r["spec"]["seed"]): r["errors"] for r in rs},
            "seconds": {str(r["spec"]["seed"]): r["seconds"] for r in rs},
        }
        ep = [first_crossing(r["epochs"], r["errors"], cfg.threshold) for r in rs]
        sec = [first_crossing(r["seconds"], r["errors"], cfg.threshold) for r in rs]
        reach[act] = {
            "epochs_per_seed": ep,
            "seconds_per_seed": sec,
            "epochs": seed_stats(ep),
            "seconds": seed_stats(sec),
        }
    ratio = {"paper": PAPER_RATIO}
    for unit in ("epochs", "seconds"):
        r, t = reach["relu"][unit]["mean"], reach["tanh"][unit]["mean"]
        ratio[unit] = t / r if r and t else None
        if ratio[unit] is None:
            # Censored seeds: their budget (the run's last point) stands in for the crossing.
            filled = {}
            for act, rs in per_act.items():
                key = "epochs" if unit == "epochs" else "seconds"
                vals = [
                    v if v is not None else (run[key][-1] if run[key] else None)
                    for v, run in zip(reach[act][f"{unit}_per_seed"], rs, strict=True)
                ]
                filled[act] = np.mean(vals) if None not in vals and vals else None
            short = {act: reach[act][unit]["mean"] is None for act in ACTIVATIONS}
            if filled["relu"] and filled["tanh"] and short["tanh"] != short["relu"]:
                bound = "at_least" if short["tanh"] else "at_most"
                ratio[f"{unit}_{bound}"] = float(filled["tanh"] / filled["relu"])
    return {
        "experiment": "Figure 1 (Krizhevsky et al. 2012): ReLU vs tanh, epochs to "
        f"{cfg.threshold:.1%} training error",
        "dataset": dataset,
        "dataset_title": title,
        "net": cfg.net,
        "net_description": NETS[cfg.net][2] + "; no regularisation",
        "train_images": n_train,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "points_per_epoch": cfg.points_per_epoch,
        "seeds": sorted(int(s) for s in curves["relu"]["train_error"]),
        "threshold": cfg.threshold,
        "paper_threshold": PAPER_THRESHOLD,
        "optimizer": "SGD, momentum 0.9, no weight decay",
        "lr": chosen,
        "lr_search": tuning,
        "device": str(per_act["relu"][0]["device"]),
        "curves": curves,
        "to_threshold": reach,
        "ratio": ratio,
        "note": "training error = error of the net's predictions on the batches it trains on, "
        "averaged over each window of 1/points_per_epoch epoch; seconds are wall time on a "
        "possibly shared machine",
    }


def _band(curve: dict[str, Any], key: str = "train_error"):
    """Mean, min and max over seeds at each point (points a diverged seed lacks: skipped)."""
    runs = list(curve[key].values())
    n = max(len(r) for r in runs)
    mean, lo, hi = [], [], []
    for i in range(n):
        v = [r[i] for r in runs if i < len(r) and r[i] is not None]
        mean.append(np.mean(v) if v else np.nan)
        lo.append(min(v) if v else np.nan)
        hi.append(max(v) if v else np.nan)
    return np.array(mean), np.array(lo), np.array(hi)


def plot_figure1(result: dict[str, Any], path: str | Path) -> Path:
    fig, (ax_e, ax_s) = plt.subplots(1, 2, figsize=(12, 4.6))
    th = result["threshold"]
    for act, style in (("relu", "-"), ("tanh", "--")):  # Figure 1: ReLU solid, tanh dashed
        c = result["curves"][act]
        mean, lo, hi = _band(c)
        x = np.array(c["epochs"][: len(mean)])
        label = f"{'ReLU' if act == 'relu' else 'tanh'} (lr {c['lr']:g})"
        line = ax_e.plot(x, 100 * mean, style, lw=1.8, label=label)[0]
        ax_e.fill_between(x, 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2)
        yerr = 100 * np.vstack([mean - lo, hi - mean])
        ax_e.errorbar(
            x,
            100 * mean,
            yerr=yerr,
            fmt="none",
            ecolor=line.get_color(),
            alpha=0.6,
            capsize=2,
            lw=0.8,
        )
        smean, _, _ = _band(c, "seconds")
        ax_s.plot(
            smean[: len(mean)], 100 * mean, style, color=line.get_color(), lw=1.8, label=label
        )
        ax_s.fill_between(smean[: len(mean)], 100 * lo, 100 * hi, color=line.get_color(), alpha=0.2)
    for ax in (ax_e, ax_s):
        ax.axhline(100 * th, color="grey", ls=":", lw=1, label=f"{th:.1%} training error")
        ax.set_ylabel("training error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(0, None)
    ax_e.set_xlabel("epochs")
    ax_s.set_xlabel("training seconds (mean over seeds)")
    r = result["ratio"]
    ratio = (
        f"tanh / ReLU = {ratio_text(r, 'epochs')} in epochs, {ratio_text(r, 'seconds')} in seconds"
    )
    fig.suptitle(
        f"Figure 1 on {result['dataset_title']}: ReLU vs tanh to {th:.1%} training error:\n"
        f"{ratio} (paper, CIFAR-10: {PAPER_RATIO:g}x)\n"
        + (
            "the 2012 file's five-layer net (layers-80sec), its init"
            if result.get("net") == "layers-80sec"
            else "four-layer conv net"
        )
        + f", {len(result['seeds'])} seeds (line: mean, band and bars: "
        f"min-max), {result['train_images']} training images, batch {result['batch_size']}",
        fontsize=9.5,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def ratio_text(r: dict[str, Any], unit: str) -> str:
    """ "1.23x", "at least 1.50x", "at most 0.80x" or "n/a" (see the module doc)."""
    if r.get(unit):
        return f"{r[unit]:.2f}x"
    for bound in ("at_least", "at_most"):
        if r.get(f"{unit}_{bound}"):
            return f"{bound.replace('_', ' ')} {r[f'{unit}_{bound}']:.2f}x"
    return "n/a"


def figure1_markdown(result: dict[str, Any]) -> str:
    th = result["threshold"]

    def f(s: dict[str, Any], digits: int) -> str:
        if s["mean"] is None:
            return f"not reached ({s['reached']} of {len(result['seeds'])} seeds)"
        return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    rows = []
    for act in ACTIVATIONS:
        t = result["to_threshold"][act]
        final = [v[-1] for v in result["curves"][act]["train_error"].values() if v and v[-1]]
        rows.append(
            [
                "ReLU" if act == "relu" else "tanh",
                f"{result['lr'][act]:g}",
                f(t["epochs"], 3),
                f(t["seconds"], 1),
                f"{100 * np.mean(final):.1f}" if final else "n/a",
            ]
        )
    r = result["ratio"]

    def ratio(unit):
        return ratio_text(r, unit)

    rule = result.get("threshold_rule", "given")
    searched = next((v for v in result["lr_search"].values() if isinstance(v, list)), [])
    search = result.get("search_epochs", result["epochs"])
    text = (
        f"Figure 1 on {result['dataset_title']}, {len(result['seeds'])} seeds, "
        f"{result['train_images']} training images, {result['epochs']} epochs, threshold "
        f"{th:.1%} training error (paper: {PAPER_THRESHOLD:.0%})"
        + ("" if rule == "given" else f": {rule}")
        + f". Net: {result.get('net_description', result.get('net'))}. Learning rates: "
        + (f"the best of {len(searched)} rates per net over {search}-epoch runs (lowest mean "
           "training error)" if searched else "fixed")
        + f"; {result.get('mode', 'fp32')} on {result['device']}.\n\n"
    )  # fmt: skip
    text += markdown_table(
        [
            "activation",
            "lr",
            f"epochs to {th:.1%} (mean, min-max)",
            f"seconds to {th:.1%}",
            "final training error (%)",
        ],
        rows,
    )
    text += (
        f"\nRatio tanh / ReLU: {ratio('epochs')} in epochs, {ratio('seconds')} in seconds "
        f"(paper, CIFAR-10: about {PAPER_RATIO:g}x)"
        + (
            " (n/a: some seeds of both nets never reached the threshold)"
            if ratio("epochs") == "n/a"
            else ""
        )
        + ".\n"
    )
    if "rows" in result:  # the engine's summary: the 95% interval over seeds
        text += "\n**Over seeds** (mean (min-max), 95% t-interval)\n\n"
        text += study_table(result, METRICS, (("lr", lambda r: f"{r['lr']:g}"),))
    return text
