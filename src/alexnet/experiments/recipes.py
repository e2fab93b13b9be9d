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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.config import LAYERS, apply_overrides, get_profile
from alexnet.data import open_store
from alexnet.errors import BadInput
from alexnet.experiments.ablate import default_store
from alexnet.experiments.common import markdown_table, progress, read_step_losses, train_or_resume
from alexnet.fileio import read_json, write_json, write_text
from alexnet.plots import plt, save_figure
from alexnet.train import RunConfig

DEFAULT_RECIPES = ("paper", "cuda-convnet")
LOSS_AT = (50, 100, 200, 300, 400)  # the table's fixed steps (those within the budget)


@dataclass(frozen=True)
class Control:
    key: str
    label: str
    sets: tuple[str, ...]


def _per_layer_json(default: float, **values: float) -> str:
    d = {name: values.get(name, default) for name in LAYERS}
    return json.dumps(d, separators=(",", ":"))


# One change each from the `paper` profile (facts: the 2012 code's layers-145 and Caffe).
CONTROLS = (
    Control("baseline", "paper, as printed", ()),
    Control(
        "inverted", "inverted dropout (x2 in training; Caffe)", ("model.dropout_style=inverted",)
    ),
    Control(
        "init03",
        "conv3-5 init std 0.03 (2012 code)",
        ("model.init_std=" + _per_layer_json(0.01, conv3=0.03, conv4=0.03, conv5=0.03),),
    ),
    Control("alpha5", "LRN alpha / 5 (2012 code)", ("model.lrn_alpha=2e-05",)),
    Control(
        "order",
        "2012 layer order (conv1 LRN before ReLU; conv5 pool then ReLU)",
        ("model.order=cuda-convnet",),
    ),
    Control("snorm", "spatial norm after conv2 (2012 code)", ("model.spatial_norm=true",)),
    Control(
        "biaslr",
        "bias lr x2, no bias decay (2012 code)",
        ("train.bias_lr_mult=2", "train.bias_decay=false"),
    ),
    Control(
        "bias01",
        "biases 0.1 instead of 1 (Caffe)",
        (
            "model.init_bias="
            + _per_layer_json(0.0, conv2=0.1, conv4=0.1, conv5=0.1, fc6=0.1, fc7=0.1),
        ),  # fmt: skip
    ),
    Control("bias0", "all biases 0", ("model.init_bias=" + _per_layer_json(0.0),)),
    Control("scale01", "inputs on the [0, 1] scale (x 1/255)", ("data.input_scale=0.00392156863",)),
    Control(
        "lighting",
        "2012 colour noise (sqrt eigenvalues, image / 1.1)",
        ("data.lighting=cuda-convnet",),
    ),
)
BY_KEY = {c.key: c for c in CONTROLS}


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
    sets: tuple[str, ...] = ()  # --set overrides for every run (e.g. a smaller batch for tests)


def parse_controls(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    if text == "all":
        return tuple(c.key for c in CONTROLS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in BY_KEY]
    if bad:
        raise BadInput(f"--controls {','.join(bad)}: valid are {', '.join(BY_KEY)} (or all)")
    return tuple(dict.fromkeys(["baseline", *keys]))


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


def _run_config(cfg: RecipesConfig, store: Path, folder: Path, seed: int, max_steps: int):
    return RunConfig(
        data=str(store),
        out=str(folder),
        seed=seed,
        device=cfg.device,
        workers=cfg.workers,
        fast=cfg.fast,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        max_steps=max_steps,
        val_limit=cfg.val_limit,
    )


def _one(cfg, store, name, profile, seed, max_steps, kind) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; its result."""
    folder = Path(cfg.out) / "runs" / f"{name}-seed{seed}"
    spec = json.loads(
        json.dumps(
            {
                "kind": kind,
                "name": name,
                "seed": seed,
                "max_steps": max_steps,
                "store": str(Path(store).resolve()),
                "fast": cfg.fast,
                "log_every": cfg.log_every,
                "val_limit": cfg.val_limit,
                "profile": profile.to_dict(),
            }
        )
    )
    done = read_json(folder / "result.json")
    if done is not None and done.get("spec") == spec:
        return done
    t0 = time.perf_counter()
    trainer = train_or_resume(
        folder, spec, profile, _run_config(cfg, store, folder, seed, max_steps)
    )
    steps, losses = read_step_losses(folder / "metrics.jsonl")
    chance = math.log(trainer.num_classes)
    epochs = [r for r in trainer.history if r.get("kind") == "epoch"]
    result = {
        "spec": spec,
        "seconds": time.perf_counter() - t0,
        "device": str(trainer.device),
        "fast_mode": dataclasses.asdict(trainer.mode),
        "batch_size": profile.train.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
        "chance_loss": chance,
        "steps": steps,
        "losses": losses,
        "leave_chance_step": leave_chance_step(steps, losses, chance, cfg.margin),
        "first_steps_mean_loss": float(np.mean(losses[:2])) if losses else None,
        "epochs": [
            {
                k: r.get(k)
                for k in (
                    "epoch",
                    "step",
                    "val_top1_error",
                    "val_top5_error",
                    "val_loss",
                    "train_loss",
                    "lr",
                    "warning",
                )
            }
            for r in epochs
        ],  # fmt: skip
    }
    write_json(folder / "result.json", result)
    if kind == "control":  # disk: a control's weights and state are not needed afterwards
        (folder / "state.pt").unlink(missing_ok=True)
        (folder / "model.safetensors").unlink(missing_ok=True)
    return result


def run_recipes(cfg: RecipesConfig) -> dict[str, Any]:
    """Runs (or resumes) the recipes and the controls; writes OUT/recipes.{json,md,png} and
    controls.png; returns the JSON."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(cfg.data) if cfg.data else default_store(cfg.out, None)
    st = open_store(store)
    n_train = st.size("train")
    recipes = {name: apply_overrides(get_profile(name), list(cfg.sets)) for name in cfg.recipes}
    controls = {
        key: apply_overrides(get_profile("paper"), [*cfg.sets, *BY_KEY[key].sets])
        for key in cfg.controls
    }  # a bad override fails here, before any training
    seeds = list(range(cfg.seeds))
    todo = len(recipes) + len(controls) * len(seeds)
    bar = progress(todo, "recipes", unit="run")
    results: dict[str, Any] = {"recipes": {}, "controls": {}}
    for name, profile in recipes.items():
        bar.set_postfix_str(name)
        per_epoch = n_train // profile.train.batch_size
        r = _one(cfg, store, name, profile, 0, cfg.epochs * per_epoch, "recipe")
        results["recipes"][name] = r
        bar.update(1)
    for seed in seeds:  # seed-major: a stopped run has every control for its first seeds
        for key, profile in controls.items():
            bar.set_postfix_str(f"{key} seed {seed}")
            r = _one(cfg, store, f"control-{key}", profile, seed, cfg.control_steps, "control")
            results["controls"].setdefault(key, []).append(r)
            bar.update(1)
    bar.close()
    summary = summarise(cfg, st, results)
    write_json(out / "recipes.json", summary)
    write_text(out / "recipes.md", recipes_markdown(summary))
    plot_recipes(summary, out / "recipes.png")
    if summary["controls"]:
        plot_controls(summary, out / "controls.png")
    return summary


def summarise(cfg: RecipesConfig, store, results) -> dict[str, Any]:
    def curve(r):
        return {"steps": r["steps"], "losses": r["losses"]}

    recipes = {}
    for name, r in results["recipes"].items():
        recipes[name] = {
            "leave_chance_step": r["leave_chance_step"],
            "first_steps_mean_loss": r["first_steps_mean_loss"],
            "loss_at": {s: loss_at(r["steps"], r["losses"], s) for s in LOSS_AT},
            "epochs": r["epochs"],
            "steps_per_epoch": r["steps_per_epoch"],
            "seconds": r["seconds"],
            "curve": curve(r),
        }
    controls = {}
    for key, rs in results["controls"].items():
        c = BY_KEY[key]
        controls[key] = {
            "label": c.label,
            "sets": list(c.sets),
            "leave_chance_step": [r["leave_chance_step"] for r in rs],
            "loss_at": {
                s: [loss_at(r["steps"], r["losses"], s) for r in rs]
                for s in LOSS_AT
                if s <= cfg.control_steps
            },
            "first_steps_mean_loss": [r["first_steps_mean_loss"] for r in rs],
            "curves": [curve(r) for r in rs],
            "seeds": [r["spec"]["seed"] for r in rs],
        }
    any_run = next(iter(results["recipes"].values()), None) or next(
        (rs[0] for rs in results["controls"].values()), None
    )
    return {
        "experiment": "do the paper's recipes learn?",
        "store": Path(store.path).name,
        "store_train_images": store.size("train"),
        "classes": store.num_classes,
        "chance_loss": math.log(store.num_classes),
        "margin": cfg.margin,
        "log_every": cfg.log_every,
        "epochs": cfg.epochs,
        "control_steps": cfg.control_steps,
        "sets": list(cfg.sets),
        "device": any_run["device"] if any_run else None,
        "fast_mode": any_run["fast_mode"] if any_run else None,
        "recipes": recipes,
        "controls": controls,
        "definition": (
            "leave_chance_step: the first logged step (each point the mean loss over "
            f"{cfg.log_every} steps) whose loss and the next two are below ln(classes) - "
            f"{cfg.margin}"
        ),
    }


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
        header = ["recipe", "leaves chance at step", "mean loss, first 2 points"]
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
