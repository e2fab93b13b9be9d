"""`alexnet report RUN`: one self-contained HTML page for a run.

Sections: the run (its recipe, and where its weights started: the profile's initialisation or
the weights it was fine-tuned from, config.json derived.init), final errors (the last epoch
record of metrics.jsonl, with the best epoch) beside chance and the paper's, training curves
(curves.png), the conv1 kernels (Figure 3, with the per-tower colour numbers of `alexnet
kernels` beside their untrained level), nearest neighbours in fc7 (Figure 4, when a store is
given with --data or the run's recorded store, config.json derived.store, still exists, beside
the share a random pick would give), the run's differences from the paper (one table, every
value that differs with the paper's beside it), then the full configuration, folded. Every
image is embedded as base64: the page can be mailed or archived alone. The intermediate files
(kernels, neighbours and their fc7 cache) go to a folder next to the page, <page>_files/, so a
second report is quick.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from alexnet.config import profile_diff
from alexnet.data import open_store
from alexnet.errors import BadInput, NotFound
from alexnet.experiments.kernels import kernels_markdown, run_kernels
from alexnet.experiments.neighbors import run_neighbors
from alexnet.fileio import read_json, write_text
from alexnet.plots import plot_curves, split_records
from alexnet.runlog import read_metrics, shows_top5

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.8em}.note{color:#666}
summary{cursor:pointer;color:#444}
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


# The paper's ILSVRC-2012 validation errors of one CNN (Table 2, "1 CNN"; docs/facts.md).
PAPER_TOP1, PAPER_TOP5 = 0.407, 0.182
# conv1's mean chroma share before training: for i.i.d. zero-mean Gaussian weights the chroma
# part holds two of the three colour directions' energy, exactly 2/3 in expectation
# (experiments/kernels.py).
UNTRAINED_CHROMA_SHARE = 2 / 3


def _provenance(cfg: dict[str, Any]) -> list[list[Any]]:
    """Rows saying which recipe the run followed and where its weights started."""
    profile, derived = cfg.get("profile", {}), cfg.get("derived", {})
    train = profile.get("train", {})
    rows: list[list[Any]] = [
        ["recipe", f"{profile.get('name')}: {profile.get('description', '')}".rstrip(": ")]
    ]
    init = derived.get("init")
    if not init:
        rows.append(["started from", "scratch: the recipe's initialisation"])
        return rows
    loaded, not_loaded = init.get("loaded") or [], init.get("not_loaded") or {}
    rows.append(
        [
            "started from",
            f"fine-tuned from {init.get('source')} (profile {init.get('profile')}, sha256 "
            f"{str(init.get('sha256'))[:12]}...)",
        ]
    )
    rows.append(["loaded from it", f"{len(loaded)} of {len(loaded) + len(not_loaded)} tensors"])
    if not_loaded:
        rows.append(["not loaded", "; ".join(f"{k}: {why}" for k, why in not_loaded.items())])
    rows.append(
        [
            "its classes",
            "the same as this run's" if init.get("classes_match") else "others (fc8 afresh)",
        ]
    )
    stats = init.get("stats")
    if stats:
        rows.append(
            [
                "preprocessing statistics",
                "this run's store" if stats == "store" else "those saved with the weights",
            ]
        )
    frozen = train.get("freeze_until") or 0
    rows.append(
        [
            "loaded layers",
            f"lr x{train.get('init_lr_mult', 1.0):g}, "
            + (
                f"frozen until epoch {frozen if isinstance(frozen, str) else f'{frozen:g}'}"
                if frozen
                else "trained from the start"
            ),
        ]
    )
    return rows


def _chance_same_class(store, nb: dict[str, Any]) -> float | None:
    """The share of neighbours in the query's class that a random pick among the searched
    training images would give: per query, its class's share of them, averaged."""
    try:
        train = store.labels("train")[: nb["train_images_searched"]]
    except (KeyError, BadInput):
        return None
    if not len(train) or not nb["queries"]:
        return None
    return sum(float((train == q["label"]).mean()) for q in nb["queries"]) / len(nb["queries"])


def _grey_store(store: str | None) -> bool:
    """Whether the run's store holds grey images (False when it is gone or unreadable)."""
    if not store:
        return False
    try:
        return open_store(store).channels == 1
    except (BadInput, NotFound, OSError):
        return False


def build_report(
    run: str | Path,
    out: str | Path | None = None,
    data: str | None = None,
    neighbors_images: int = 4,
    train_limit: int | None = 2000,
    device: str = "cpu",
) -> Path:
    """Writes OUT/report.html (OUT: a folder, default RUN) and returns its path."""
    run = Path(run)
    if not run.is_dir():
        raise NotFound(f"{run}: not a run folder (alexnet train --out RUN)")
    cfg = read_json(run / "config.json")
    if cfg is None:
        raise NotFound(f"{run}/config.json: missing or unreadable: not a run folder")
    page = Path(out or run) / "report.html"
    files = page.with_name(page.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    profile = cfg.get("profile", {})
    derived = cfg.get("derived", {})
    runcfg = cfg.get("run", {})
    parts = [f"<h1>AlexNet run report: {html.escape(run.name)}</h1>"]
    parts.append(f'<p class="note">{html.escape(str(run.resolve()))}</p>')

    # --- the run
    rows = _provenance(cfg) + [
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
        classes = derived.get("num_classes")
        top5 = shows_top5(classes)  # with 5 classes or fewer it is 0 whatever the network

        def errors(label, epoch, step, top1, five, loss, images):
            return [label, epoch, step, top1, *([five] if top5 else []), loss, images]

        rows = [
            errors(
                label,
                r["epoch"],
                r.get("step"),
                _pct(r["val_top1_error"]),
                _pct(r.get("val_top5_error")),
                f"{r['val_loss']:.4f}",
                r.get("val_images"),
            )
            for label, r in (("last", last), ("best top-1", best))
        ]
        if classes:  # what a network that has learnt nothing scores
            chance5 = max(0.0, 1 - 5 / classes)
            rows.append(
                errors(
                    f"chance ({classes} classes)",
                    "",
                    "",
                    _pct(1 - 1 / classes),
                    _pct(chance5),
                    f"{math.log(classes):.4f}",
                    "",
                )  # fmt: skip
            )
        rows.append(
            errors(
                "the paper (ILSVRC-2012, 1000 classes)",
                "",
                "",
                _pct(PAPER_TOP1),
                _pct(PAPER_TOP5),
                "",
                "",
            )  # fmt: skip
        )
        header = ["", "epoch", "step", "val top-1 error", "val top-5 error", "val loss", "images"]
        parts.append(_table(header if top5 else header[:4] + header[5:], rows))
        parts.append(
            '<p class="note">Centre view (one 224x224 patch), on the validation images the run '
            "saw (all, or run.val_limit of them). Chance: a network that predicts no better "
            "than at random (loss ln(classes)). The paper's errors are one CNN's on ImageNet, "
            "a harder task than most runs': a scale, not a target."
            + ("" if top5 else f" No top-5 error: with {classes} classes it is always 0.")
            + "</p>"
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
                ["tower", "kernels", "mean chroma share", "median", "untrained", "grey kernels"],
                [
                    [
                        n,
                        f"{t['kernels'][0]}-{t['kernels'][1]}",
                        f"{t['chroma_share_mean']:.3f}",
                        f"{t['chroma_share_median']:.3f}",
                        f"{UNTRAINED_CHROMA_SHARE:.3f}",
                        "0",
                    ]
                    for n, t in rep["towers"].items()
                ],
            )
        )
        grey = _grey_store(derived.get("store") or runcfg.get("data"))
        parts.append(
            f'<p class="note">{html.escape(kernels_markdown(rep).splitlines()[0])} '
            f"Untrained: {UNTRAINED_CHROMA_SHARE:.3f}, the expected share of random (i.i.d.) "
            "weights before training; below it, training made the kernels greyer, above it "
            "more colour-specific. The paper: tower A colour-agnostic, tower B colour-specific."
            + (
                " This run's store is grey (R = G = B): every colour channel of a kernel gets "
                "the same gradient, so its chroma part is never trained (only weight decay "
                "shrinks it) and the towers cannot differ in colour."
                if grey
                else ""
            )
            + "</p>"
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
        chance = _chance_same_class(open_store(store), nb)
        parts.append(
            f'<p class="note">{len(nb["queries"])} random {nb["split"]} images and their '
            f"{nb['k']} nearest among the first {nb['train_images_searched']} training images "
            f"of {html.escape(str(store))}; "
            f"{100 * (nb['same_class_fraction'] or 0):.0f}% share the query's class"
            + (
                f" (picked at random among those images: {100 * chance:.0f}%)"
                if chance is not None
                else ""
            )
            + ".</p>"
        )
    else:
        why = (
            "no weights"
            if not weights.exists()
            else (f"the store {store} does not exist" if store else "no store recorded")
        )
        parts.append(f"<p>Skipped: {html.escape(why)} (give one with --data STORE).</p>")

    # --- profile vs the paper: one list (config.json's derived.deviations_from_paper says the
    # same in words, from the same comparison; only entries it has beyond the table are shown)
    parts.append('<h2 id="deviations">This run\'s differences from the paper</h2>')
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
    shown = {k for k, _, _ in diff}
    extra = [d for d in derived.get("deviations_from_paper") or [] if d.split(":")[0] not in shown]
    if extra:  # recorded when the run was made, against the paper's values as they were then
        parts.append(
            '<p class="note">Also recorded in config.json (derived.deviations_from_paper):</p>'
            + _table(["recorded"], [[d] for d in extra])
        )

    parts.append('<h2 id="config">Configuration (config.json)</h2>')
    parts.append(
        "<details><summary>the full configuration as the run recorded it</summary><pre>"
        + html.escape(json.dumps(cfg, indent=2, default=str))
        + "</pre></details>"
    )

    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>AlexNet run {html.escape(run.name)}</title><style>{CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text(page, doc)
    return page
