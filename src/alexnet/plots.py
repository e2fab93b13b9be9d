"""Figures drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) of a run's metrics (runlog.read_metrics)."""
    steps = [r for r in records if r.get("kind") == "step"]
    return steps, [r for r in records if r.get("kind") != "step"]


def lr_drop_epochs(steps: list[dict], epochs: list[dict]) -> list[float]:
    """Where curves.png marks "lr / 10". An lr drop decided after epoch e acts from epoch e on
    (the plateau rule / the schedule). The trainer records the schedule's drops in every epoch
    line ("lr_drops"); a smooth decay (the demo's linear schedule) has none, however fast its
    last steps fall. For metrics without them: the plateau flags, and tenfold falls between
    logged steps."""
    if epochs and "lr_drops" in epochs[-1]:
        return sorted(set(epochs[-1]["lr_drops"]))
    drops = [r["epoch"] for r in epochs if r.get("lr_dropped")]
    lrs = [(r["epoch"], r["lr"]) for r in steps]
    for (_, lr0), (e1, lr1) in zip(lrs, lrs[1:], strict=False):
        if lr1 <= lr0 * 0.15:
            drops.append(e1)
    return sorted(set(drops))


def plot_curves(records: list[dict], out: str | Path, top5: bool = True) -> Path:
    """curves.png: train/val loss and val top-1/top-5 error against epochs, lr drops marked,
    from a run's metrics records (runlog.read_metrics). `top5`: whether to draw the top-5
    error (runlog.shows_top5: with 5 classes or fewer it is a flat line at 0)."""
    steps, epochs = split_records(records)
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot(
            [r["epoch"] for r in steps],
            [r["loss"] for r in steps],
            lw=0.8,
            alpha=0.7,
            label="train loss (per logged step)",
        )
    if epochs:
        e = [r["epoch"] for r in epochs]
        ax_loss.plot(e, [r["val_loss"] for r in epochs], "o-", label="val loss")
        ax_err.plot(e, [100 * r["val_top1_error"] for r in epochs], "o-", label="val top-1 error")
        if top5:
            top5s = [100 * r["val_top5_error"] for r in epochs]
            ax_err.plot(e, top5s, "s-", label="val top-5 error")
    drops = lr_drop_epochs(steps, epochs)
    for i, d in enumerate(drops):
        for ax in (ax_loss, ax_err):
            ax.axvline(d, color="grey", ls="--", lw=0.8, label="lr / 10" if i == 0 else None)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="validation error (centre view)")
    last = max([r["epoch"] for r in steps + epochs], default=0)
    for ax in (ax_loss, ax_err):
        if last > 0:  # both panels on the run's whole span (one point alone would fill an axis)
            ax.set_xlim(0, last * 1.03)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (a reader never sees a half-written PNG), close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
