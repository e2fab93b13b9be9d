"""`alexnet report RUN`: one self-contained HTML page for a run.

Sections: the run (profile, data, seed, device, steps), final errors (the last epoch record of
metrics.jsonl, with the best epoch), training curves (curves.png), the conv1 kernels (Figure 3,
with the per-tower colour numbers of `alexnet kernels`), nearest neighbours in fc7 (Figure 4,
when a store is given with --data or the run's recorded store, config.json derived.store, still
exists), and the run's profile against the paper's (every value that differs, with the paper's
value beside it), then the full configuration. Every image is embedded as base64: the page can
be mailed or archived alone. The intermediate files (kernels, neighbours and their fc7 cache)
go to a folder next to the page, <page>_files/, so a second report is quick.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from alexnet.config import profile_diff
from alexnet.errors import NotFound
from alexnet.experiments.kernels import kernels_markdown, run_kernels
from alexnet.experiments.neighbors import run_neighbors
from alexnet.fileio import read_json, write_text
from alexnet.plots import plot_curves, split_records
from alexnet.runlog import read_metrics

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}.note{color:#666}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def build_report(
    run: str | Path,
    out: str | Path | None = None,
    data: str | None = None,
    neighbors_images: int = 4,
    train_limit: int | None = 2000,
    device: str = "cpu",
) -> Path:
    """Writes the HTML page (default RUN/report.html) and returns its path."""
    run = Path(run)
    if not run.is_dir():
        raise NotFound(f"{run}: not a run folder (alexnet train --out RUN)")
    cfg = read_json(run / "config.json")
    if cfg is None:
        raise NotFound(f"{run}/config.json: missing or unreadable: not a run folder")
    page = Path(out) if out else run / "report.html"
    files = page.with_name(page.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    profile = cfg.get("profile", {})
    derived = cfg.get("derived", {})
    runcfg = cfg.get("run", {})
    parts = [f"<h1>AlexNet run report: {html.escape(run.name)}</h1>"]
    parts.append(
        f'<p class="note">{html.escape(str(run.resolve()))}; profile '
        f"<b>{html.escape(str(profile.get('name')))}</b>: "
        f"{html.escape(str(profile.get('description', '')))}</p>"
    )

    # --- the run
    rows = [
        ["profile", profile.get("name")],
        ["data (store)", runcfg.get("data")],
        ["classes", derived.get("num_classes")],
        ["seed", runcfg.get("seed")],
        ["device", derived.get("device")],
        ["world size", derived.get("world_size")],
        ["batch size", profile.get("train", {}).get("batch_size")],
        ["steps per epoch", derived.get("steps_per_epoch")],
        ["epochs (recipe)", profile.get("train", {}).get("epochs")],
        ["max steps", runcfg.get("max_steps")],
        ["torch", derived.get("torch")],
    ]
    parts.append('<h2 id="run">Run</h2>' + _table(["", "value"], rows))

    # --- final errors
    parts.append('<h2 id="errors">Final errors</h2>')
    metrics = run / "metrics.jsonl"
    records = read_metrics(metrics)
    steps, epochs = split_records(records)
    if epochs:
        last = epochs[-1]
        best = min(epochs, key=lambda r: r["val_top1_error"])
        parts.append(
            _table(
                ["", "epoch", "step", "val top-1 error", "val top-5 error", "val loss", "images"],
                [
                    [
                        label,
                        r["epoch"],
                        r.get("step"),
                        _pct(r["val_top1_error"]),
                        _pct(r["val_top5_error"]),
                        f"{r['val_loss']:.4f}",
                        r.get("val_images"),
                    ]
                    for label, r in (("last", last), ("best top-1", best))
                ],
            )
        )
        parts.append(
            '<p class="note">Centre view (one 224x224 patch), on the validation images the run '
            "saw (all, or run.val_limit spread over the split). The paper's ILSVRC-2012 "
            "validation error with one CNN: 40.7% top-1, 18.2% top-5 (ten views).</p>"
        )
    elif steps:
        parts.append(
            f"<p>No finished epoch yet; last logged step {steps[-1]['step']}, "
            f"training loss {steps[-1]['loss']:.4f}.</p>"
        )
    else:
        parts.append("<p>No metrics yet (metrics.jsonl is missing or empty).</p>")

    # --- curves
    parts.append('<h2 id="curves">Training curves</h2>')
    curves = run / "curves.png"
    if not curves.exists() and metrics.exists() and (steps or epochs):
        curves = plot_curves(records, files / "curves.png")
    parts.append(_img(curves, "training curves") if curves.exists() else "<p>No curves.</p>")

    # --- kernels
    parts.append('<h2 id="kernels">conv1 kernels (Figure 3)</h2>')
    weights = run / "model.safetensors"
    if weights.exists():
        rep = run_kernels(run, files / "kernels")
        parts.append(_img(files / "kernels" / "kernels.png", "conv1 kernels"))
        parts.append(
            _table(
                ["tower", "kernels", "mean chroma share", "median"],
                [
                    [
                        n,
                        f"{t['kernels'][0]}-{t['kernels'][1]}",
                        f"{t['chroma_share_mean']:.3f}",
                        f"{t['chroma_share_median']:.3f}",
                    ]
                    for n, t in rep["towers"].items()
                ],
            )
        )
        parts.append(
            f'<p class="note">{html.escape(kernels_markdown(rep).splitlines()[0])} '
            "The paper: tower A colour-agnostic, tower B colour-specific.</p>"
        )
    else:
        parts.append("<p>No weights (model.safetensors) in the run folder.</p>")

    # --- neighbours
    parts.append('<h2 id="neighbors">Nearest neighbours in fc7 (Figure 4)</h2>')
    store = data or derived.get("store") or runcfg.get("data")
    if weights.exists() and store and (Path(store) / "manifest.json").exists():
        nb = run_neighbors(
            run,
            store,
            files / "neighbors",
            images=neighbors_images,
            top5=True,
            train_limit=train_limit,
            device=device,
        )
        parts.append(_img(files / "neighbors" / "neighbors.png", "nearest neighbours"))
        parts.append(
            f'<p class="note">{len(nb["queries"])} random {nb["split"]} images and their '
            f"{nb['k']} nearest among the first {nb['train_images_searched']} training images "
            f"of {html.escape(str(store))}; "
            f"{100 * (nb['same_class_fraction'] or 0):.0f}% share the query's class.</p>"
        )
    else:
        why = (
            "no weights"
            if not weights.exists()
            else (f"the store {store} does not exist" if store else "no store recorded")
        )
        parts.append(f"<p>Skipped: {html.escape(why)} (give one with --data STORE).</p>")

    # --- profile vs the paper
    parts.append('<h2 id="deviations">This run\'s profile against the paper</h2>')
    diff = profile_diff(profile) if profile else []
    if diff:
        parts.append(
            _table(
                ["value", "this run", "the paper"],
                [[k, json.dumps(a), json.dumps(b)] for k, a, b in diff],
            )
        )
    else:
        parts.append("<p>No differences: this run used the paper's values throughout.</p>")
    listed = derived.get("deviations_from_paper")
    if listed:
        parts.append(
            '<p class="note">As recorded in config.json (derived.deviations_from_paper):'
            "</p><pre>" + html.escape("\n".join(listed)) + "</pre>"
        )

    parts.append('<h2 id="config">Configuration (config.json)</h2>')
    parts.append("<pre>" + html.escape(json.dumps(cfg, indent=2, default=str)) + "</pre>")

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>AlexNet run {html.escape(run.name)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text(page, doc)
    return page
