"""`alexnet recipes`: do the paper's training recipes learn, and if one waits, why?

Two parts, each resumable (a finished run is cached in OUT/runs/<name>/result.json, an
interrupted one resumes from its checkpoint):

1. Recipes. Each named profile (default `paper` and `cuda-convnet`) is trained as it is, with
   its own lr, init and schedule laid out for its full length (90 / 91 epochs), for the first
   --epochs epochs (`max_steps`: the lr schedule is not squeezed into the short run), validated
   on the whole val split after every epoch.
2. Controls (--controls). Short runs of --control-steps steps from the `paper` profile, each
   changing one thing towards the 2012 code (or another common choice), --seeds seeds each:
   which change makes the wait at chance go away?

For every run: the training loss logged every --log-every steps (each point the mean over those
steps), the step at which it leaves chance (`leave_chance_step`: the first logged step whose
loss and the next two logged losses are all below ln(classes) - --margin; chance is the loss of
a uniform prediction), the loss at fixed steps, and for the recipes the validation errors.

Writes OUT/recipes.json, recipes.md (the tables), recipes.png (loss against steps and
validation error against epochs for the recipes) and controls.png (each control's loss curve,
mean over seeds).

A declaration for the study engine (experiments.common): the recipes are rows with seed 0, the
controls rows with --seeds seeds; the engine runs, caches and summarises them over seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.config import LAYERS, apply_overrides, get_profile
from alexnet.data import open_store
from alexnet.experiments.common import (
    Metric,
    Row,
    Study,
    default_store,
    markdown_table,
    mean_loss_to,
    read_step_losses,
    run_study,
    study_table,
    summarise_study,
    train_run,
    write_study,
)
from alexnet.plots import plt, save_figure

DEFAULT_RECIPES = ("paper", "cuda-convnet")
LOSS_AT = (50, 100, 200, 300, 400)  # the table's fixed steps (those within the budget)
METRICS = (
    Metric("leave_chance_step", "leaves chance at step", digits=0),
    Metric("first_steps_mean_loss", "mean loss, steps 1 to 2 x log-every", digits=3),
    Metric("last_loss", "last logged loss", digits=3),
)


def _per_layer_json(default: float, **values: float) -> str:
    d = {name: values.get(name, default) for name in LAYERS}
    return json.dumps(d, separators=(",", ":"))


# One change each from the `paper` profile (facts: the 2012 code's layers-145 and Caffe).
CONTROLS = (
    Row("baseline", "paper, as printed", ()),
    Row("inverted", "inverted dropout (x2 in training; Caffe)", ("model.dropout_style=inverted",)),
    Row(
        "init03",
        "conv3-5 init std 0.03 (2012 code)",
        ("model.init_std=" + _per_layer_json(0.01, conv3=0.03, conv4=0.03, conv5=0.03),),
    ),
    Row("alpha5", "LRN alpha / 5 (2012 code)", ("model.lrn_alpha=2e-05",)),
    Row(
        "order",
        "2012 layer order (conv1 LRN before ReLU; conv5 pool then ReLU)",
        ("model.order=cuda-convnet",),
    ),
    Row("snorm", "spatial norm after conv2 (2012 code)", ("model.spatial_norm=true",)),
    Row(
        "biaslr",
        "bias lr x2, no bias decay (2012 code)",
        ("train.bias_lr_mult=2", "train.bias_decay=false"),
    ),
    Row(
        "bias01",
        "biases 0.1 instead of 1 (Caffe)",
        (
            "model.init_bias="
            + _per_layer_json(0.0, conv2=0.1, conv4=0.1, conv5=0.1, fc6=0.1, fc7=0.1),
        ),  # fmt: skip
    ),
    Row("bias0", "all biases 0", ("model.init_bias=" + _per_layer_json(0.0),)),
    Row("scale01", "inputs on the [0, 1] scale (x 1/255)", ("data.input_scale=0.00392156863",)),
    Row(
        "lighting",
        "2012 colour noise (sqrt eigenvalues, image / 1.1)",
        ("data.lighting=cuda-convnet",),
    ),
)
BY_KEY = {c.key: c for c in CONTROLS}


# Quick: a smoke test of both parts on a 2,000-image store (the recipe's first epoch, two
# controls); full: the defaults below.
QUICK = dict(recipes=("paper",), epochs=1, controls=("baseline", "init03"), control_steps=30,
             seeds=2, val_limit=320, store_limit=2000)  # fmt: skip
FULL = dict(recipes=DEFAULT_RECIPES, epochs=3, controls=(), control_steps=400, seeds=2,
            val_limit=None, store_limit=None)  # fmt: skip


@dataclass
class RecipesConfig:
    out: str = "runs/recipes"
    data: str | None = None  # a prepared store (default: Fashion-MNIST prepared into OUT)
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    epochs: int = 3
    controls: tuple[str, ...] = ()  # control keys (baseline included automatically)
    control_steps: int = 400
    seeds: int = 2  # of the controls (the recipes: seed 0)
    margin: float = 0.1
    log_every: int = 10
    checkpoint_every: int = 200
    device: str = "auto"
    workers: int | None = None
    fast: bool = True
    val_limit: int | None = None
    store_limit: int | None = None  # images per split of the Fashion-MNIST store it prepares
    sets: tuple[str, ...] = ()  # --set overrides for every run (e.g. a smaller batch for tests)


def leave_chance_step(
    steps: list[int], losses: list[float], chance: float, margin: float
) -> int | None:
    """The first logged step whose loss and the next two logged losses are all below
    chance - margin (None if there is none): the net has left the uniform prediction for good,
    not for one noisy window."""
    below = [v < chance - margin for v in losses]
    for i in range(len(below)):
        if all(below[i : i + 3]) and i + 3 <= len(below):
            return steps[i]
    return None


def loss_at(steps: list[int], losses: list[float], step: int) -> float | None:
    """The logged loss of the window ending at `step` (None if not logged)."""
    for s, v in zip(steps, losses, strict=True):
        if s == step:
            return v
    return None


def _one(cfg: RecipesConfig, store: Path, row: Row, seed: int, folder: Path, spec) -> dict:
    """Train one recipe or control run; its loss curve, leave-chance step and epochs."""
    t = train_run(folder, spec, _profile(cfg, row), data=str(store), seed=seed,
                  device=cfg.device, workers=cfg.workers, fast=cfg.fast,
                  checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                  max_steps=spec["max_steps"], val_limit=cfg.val_limit)  # fmt: skip
    steps, losses = read_step_losses(folder / "metrics.jsonl")
    chance = math.log(t["num_classes"])
    keep = ("epoch", "step", "val_top1_error", "val_top5_error", "val_loss", "train_loss", "lr",
            "warning")  # fmt: skip
    if spec["kind"] == "control":  # disk: a control's weights and state are not needed after
        (folder / "state.pt").unlink(missing_ok=True)
        (folder / "model.safetensors").unlink(missing_ok=True)
    return {
        "seconds": t["seconds"], "device": t["device"], "fast_mode": t["fast_mode"],
        "batch_size": spec["profile"]["train"]["batch_size"],
        "steps_per_epoch": t["steps_per_epoch"], "chance_loss": chance, "steps": steps,
        "losses": losses, "leave_chance_step": leave_chance_step(steps, losses, chance,
                                                                 cfg.margin),
        "first_steps_mean_loss": mean_loss_to(steps, losses, 2 * cfg.log_every),
        "last_loss": losses[-1] if losses else None,
        "epochs": [{k: r.get(k) for k in keep} for r in t["history"] if r.get("kind") == "epoch"],
    }  # fmt: skip


def _profile(cfg: RecipesConfig, row: Row):
    """A recipe as it is, or `paper` with the control's change (and --set for both)."""
    name = row.note.get("profile", "paper")
    return apply_overrides(get_profile(name), [*cfg.sets, *row.sets])


def recipes_study(cfg: RecipesConfig, store: Path) -> Study:
    n_train = open_store(store).size("train")
    rows = [Row(name, name, (), {"kind": "recipe", "profile": name}, (0,)) for name in cfg.recipes]
    rows += [Row(f"control-{k}", BY_KEY[k].label, BY_KEY[k].sets, {"kind": "control"})
             for k in cfg.controls]  # fmt: skip
    profiles = {row.key: _profile(cfg, row) for row in rows}  # a bad override fails here

    def spec(row: Row, seed: int) -> dict[str, Any]:
        p = profiles[row.key]
        steps = (cfg.epochs * (n_train // p.train.batch_size) if row.note["kind"] == "recipe"
                 else cfg.control_steps)  # fmt: skip
        return {"kind": row.note["kind"], "name": row.key, "max_steps": steps,
                "store": str(Path(store).resolve()), "fast": cfg.fast, "log_every": cfg.log_every,
                "val_limit": cfg.val_limit, "profile": p.to_dict()}  # fmt: skip

    budget = {"epochs": cfg.epochs, "control_steps": cfg.control_steps}
    return Study("recipes", cfg.out, rows, range(cfg.seeds), budget, spec,
                 lambda row, seed, folder, s: _one(cfg, store, row, seed, folder, s), METRICS,
                 device=cfg.device)  # fmt: skip


def run_recipes(cfg: RecipesConfig) -> dict[str, Any]:
    """Runs (or resumes) the recipes and the controls; writes OUT/recipes.{json,md,png} and
    controls.png; returns the JSON."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    store = Path(cfg.data) if cfg.data else default_store(cfg.out, cfg.store_limit)
    study = recipes_study(cfg, store)
    results = run_study(study)
    summary = summarise(cfg, open_store(store), summarise_study(study, results), results)
    write_study(cfg.out, "recipes", summary, recipes_markdown(summary),
                lambda path: plot_recipes(summary, path))  # fmt: skip
    if summary["controls"]:
        plot_controls(summary, Path(cfg.out) / "controls.png")
    return summary


def summarise(cfg: RecipesConfig, store, summary: dict[str, Any], results) -> dict[str, Any]:
    def curve(r):
        return {"steps": r["steps"], "losses": r["losses"]}

    recipes, controls = {}, {}
    for name in cfg.recipes:
        r = results[name][0]
        recipes[name] = {
            "leave_chance_step": r["leave_chance_step"],
            "first_steps_mean_loss": r["first_steps_mean_loss"],
            "loss_at": {s: loss_at(r["steps"], r["losses"], s) for s in LOSS_AT},
            "epochs": r["epochs"], "steps_per_epoch": r["steps_per_epoch"],
            "seconds": r["seconds"], "curve": curve(r),
        }  # fmt: skip
    for key in cfg.controls:
        rs, c = results[f"control-{key}"], BY_KEY[key]
        controls[key] = {
            "label": c.label, "sets": list(c.sets),
            "leave_chance_step": [r["leave_chance_step"] for r in rs],
            "loss_at": {s: [loss_at(r["steps"], r["losses"], s) for r in rs]
                        for s in LOSS_AT if s <= cfg.control_steps},
            "first_steps_mean_loss": [r["first_steps_mean_loss"] for r in rs],
            "curves": [curve(r) for r in rs], "seeds": [r["spec"]["seed"] for r in rs],
        }  # fmt: skip
    any_run = next(rs[0] for rs in results.values()) if results else None
    return summary | {
        "experiment": "do the paper's recipes learn?", "store": Path(store.path).name,
        "store_train_images": store.size("train"), "classes": store.num_classes,
        "chance_loss": math.log(store.num_classes), "margin": cfg.margin,
        "log_every": cfg.log_every, "epochs": cfg.epochs, "control_steps": cfg.control_steps,
        "sets": list(cfg.sets), "device": any_run["device"] if any_run else None,
        "fast_mode": any_run["fast_mode"] if any_run else None,
        "recipes": recipes, "controls": controls,
        "definition": (
            "leave_chance_step: the first logged step (each point the mean loss over "
            f"{cfg.log_every} steps) whose loss and the next two are below ln(classes) - "
            f"{cfg.margin}"
        ),
    }  # fmt: skip


def _steps_text(v) -> str:
    return "-" if v is None else str(v)


def recipes_markdown(summary: dict[str, Any]) -> str:
    chance, m = summary["chance_loss"], summary["margin"]
    mode = summary.get("fast_mode") or {}
    prec = mode.get("autocast_dtype") or "float32"
    text = (
        f"Store `{summary['store']}` ({summary['store_train_images']:,} training images, "
        f"{summary['classes']} classes; chance loss ln {summary['classes']} = {chance:.3f}); "
        f"{prec} on {summary['device']}. Leaves chance: {summary['definition']}; "
        "'-' = not within the budget.\n\n"
    )
    if summary["recipes"]:
        header = ["recipe", "leaves chance at step", "mean loss, steps 1 to 2 x log-every"]
        header += [f"loss at step {s}" for s in LOSS_AT]
        n_ep = max(len(r["epochs"]) for r in summary["recipes"].values())
        header += [f"val top-1 err, epoch {e + 1}" for e in range(n_ep)]
        rows = []
        for name, r in summary["recipes"].items():
            row = [f"`{name}`", _steps_text(r["leave_chance_step"]),
                   f"{r['first_steps_mean_loss']:.2f}"]  # fmt: skip
            row += ["-" if r["loss_at"][s] is None else f"{r['loss_at'][s]:.3f}" for s in LOSS_AT]
            errs = [f"{100 * e['val_top1_error']:.2f}%" for e in r["epochs"]]
            row += errs + ["-"] * (n_ep - len(errs))
            rows.append(row)
        text += f"**Recipes** ({summary['epochs']} epochs each, seed 0)\n\n"
        text += markdown_table(header, rows) + "\n"
    if summary["controls"]:
        steps = [s for s in LOSS_AT if s <= summary["control_steps"]]
        header = ["change from `paper`", "override", "leaves chance at step (per seed)"]
        header += [f"loss at step {s}" for s in steps]
        rows = []
        for c in summary["controls"].values():
            row = [c["label"], ", ".join(f"`{s}`" for s in c["sets"]) or "-",
                   ", ".join(_steps_text(v) for v in c["leave_chance_step"])]  # fmt: skip
            for s in steps:
                vals = [v for v in c["loss_at"][s] if v is not None]
                row.append(", ".join(f"{v:.3f}" for v in vals) or "-")
            rows.append(row)
        text += (
            f"**Controls** ({summary['control_steps']} steps each, seeds "
            f"{', '.join(map(str, next(iter(summary['controls'].values()))['seeds']))}; one "
            f"value per seed; chance {chance:.3f}, threshold {chance - m:.3f})\n\n"
        )
        text += markdown_table(header, rows)
    text += "\n**Over seeds** (mean (min-max), 95% t-interval; a seed that never left chance: "
    text += "'n of N reached')\n\n" + study_table(summary, METRICS)
    return text


def plot_recipes(summary: dict[str, Any], path: str | Path) -> Path:
    fig, (ax_l, ax_e) = plt.subplots(1, 2, figsize=(12, 4.4))
    chance = summary["chance_loss"]
    for name, r in summary["recipes"].items():
        c = r["curve"]
        ax_l.plot(c["steps"], c["losses"], lw=1, label=name)
        e = r["epochs"]
        if e:
            ax_e.plot([x["epoch"] for x in e], [100 * x["val_top1_error"] for x in e], "o-",
                      label=f"{name} top-1")  # fmt: skip
    ax_l.axhline(chance, color="grey", ls=":", label=f"chance, ln {summary['classes']}")
    ax_l.set(xlabel="step", ylabel="training loss (mean per logged window)",
             title="training loss", ylim=(0, max(4.0, chance * 1.6)))  # fmt: skip
    ax_e.axhline(100 * (1 - 1 / summary["classes"]), color="grey", ls=":", label="chance")
    ax_e.set(xlabel="epoch", ylabel="validation top-1 error (%)", title="validation error",
             ylim=(0, 100))  # fmt: skip
    for ax in (ax_l, ax_e):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"The recipes as they are on {summary['store']} ({summary['store_train_images']:,} "
        f"images), {summary['epochs']} epochs, seed 0",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)


def plot_controls(summary: dict[str, Any], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5))
    for key, c in summary["controls"].items():
        curves = c["curves"]
        n = min(len(x["losses"]) for x in curves)
        mean = np.mean([x["losses"][:n] for x in curves], axis=0)
        ax.plot(curves[0]["steps"][:n], mean, lw=2.2 if key == "baseline" else 1.1,
                color="black" if key == "baseline" else None, label=c["label"])  # fmt: skip
    chance = summary["chance_loss"]
    ax.axhline(chance, color="grey", ls=":", lw=1)
    ax.axhline(chance - summary["margin"], color="grey", ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)",
           ylim=(0, max(3.5, chance * 1.4)),
           title=f"`paper` with one change each, {summary['control_steps']} steps; dotted: "
                 "chance, dashed: the leave-chance threshold")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)
