"""What the experiments share: Markdown tables, progress bars, the one place they train and
evaluate the paper's network (`train_run`: every call to the Trainer goes through here), and the
study engine (`Study`, `run_study`, `summarise_study`, `write_study`): ablate, recipes,
finetune and figure1 are declarations of rows x seeds x budget that it runs, caches,
summarises over seeds and writes with their provenance.

Why one file of this length: the engine and the training helpers are what the four studies
share; a module of its own would be one more rank in the layering for no separation."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from alexnet.benchmarks.report import machine_info
from alexnet.data import make_eval_loader, prepare_store
from alexnet.data.sources import FASHION_MNIST_DIR
from alexnet.devices import resolve_device
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_model
from alexnet.fileio import read_json, write_json, write_text
from alexnet.plots import plt, save_figure
from alexnet.train import RunConfig, Trainer


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def progress(total, desc: str, unit: str = "step", disable: bool | None = None):
    """A tqdm bar on stderr (shown on a terminal; silent in tests and logs unless asked);
    `total` a number, or the iterable the bar walks through."""
    if disable is None:
        disable = not sys.stderr.isatty()
    if isinstance(total, int):
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)
    return tqdm(total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)


def train_or_resume(folder: str | Path, spec: dict[str, Any], profile, run) -> Trainer:
    """Train one experiment run in `folder` until run.max_steps (or the recipe's end), resuming
    an interrupted run of the same `spec` from its checkpoint; any other content of the folder
    (a different spec, or no checkpoint yet) is removed and the run starts over. Returns the
    Trainer (its model holds the final weights). Ctrl-C: checkpoint, then KeyboardInterrupt."""
    folder = Path(folder)
    resume = read_json(folder / "spec.json") == spec and (folder / "state.pt").exists()
    if not resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "spec.json", spec)
    trainer = Trainer(profile, run, resume=resume)
    done = run.max_steps is not None and trainer.pos.step >= run.max_steps
    if not done and trainer.fit()["status"] == "interrupted":
        raise KeyboardInterrupt
    return trainer


def evaluate_trainer(trainer: Trainer, split: str, limit: int | None, batch_size: int = 32):
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


def train_run(folder: Path, spec: dict[str, Any], profile, evaluate: Sequence[tuple] = (),
              **run: Any) -> dict[str, Any]:  # fmt: skip
    """One training run of the paper's network (train_or_resume with RunConfig(**run, out=
    folder)), then its evaluation on each (split, limit) of `evaluate`; returns what the
    experiments read of it as plain numbers (so that only this file knows the Trainer)."""
    t0 = time.perf_counter()
    trainer = train_or_resume(folder, spec, profile, RunConfig(out=str(folder), **run))
    seconds = time.perf_counter() - t0  # training only (a resumed run: since the resume)
    return {
        "seconds": seconds,
        "steps": trainer.pos.step,
        "device": str(trainer.device),
        "fast_mode": dataclasses.asdict(trainer.mode),
        "steps_per_epoch": trainer.steps_per_epoch,
        "num_classes": trainer.num_classes,
        "history": list(trainer.history),
        "loaded": len(trainer.init_report["loaded"]) if trainer.init_report else 0,
        "eval": {split: evaluate_trainer(trainer, split, limit) for split, limit in evaluate},
    }


def default_store(out: str | Path, limit: int | None = None) -> Path:
    """Prepare Fashion-MNIST (the embedded dataset) into OUT, through `alexnet prepare`."""
    store = Path(out) / ("store-fashion-mnist" + (f"-{limit}" if limit else ""))
    if not (store / "manifest.json").exists():
        print(f"==> preparing Fashion-MNIST into {store}", file=sys.stderr, flush=True)
        prepare_store(FASHION_MNIST_DIR, store, kind="fashion-mnist", limit=limit)
    return store


def read_step_losses(metrics: str | Path) -> tuple[list[int], list[float]]:
    """(steps, logged training losses) of a run's metrics.jsonl."""
    steps, losses = [], []
    for line in Path(metrics).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("kind") == "step":
                steps.append(int(r["step"]))
                losses.append(float(r["loss"]))
    return steps, losses


def mean_loss_to(steps: list[int], losses: list[float], last: int) -> float | None:
    """The mean training loss over steps 1..last from the logged means, each weighted by the
    steps it covers (the step since the previous record: step 1 is logged alone)."""
    total = n = 0.0
    prev = 0
    for s, v in zip(steps, losses, strict=True):
        if s > last:
            break
        total, n, prev = total + v * (s - prev), n + (s - prev), s
    return total / n if n else None


# --- the study engine ------------------------------------------------------------------------
# A study is a declaration: rows x seeds x a budget, and a function that runs one (row, seed).
# The engine runs them (each in OUT/runs/<row>-seed<s>/, cached and resumable), summarises each
# metric over seeds (mean, range, 95% t-interval) and writes OUT/<name>.{json,md,png} with the
# commit, torch version, machine and date that made them.

# Two-sided 95% Student t quantiles for 1-30 degrees of freedom (any statistics table), used
# when scipy (a dev extra only) is not installed.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    try:
        from scipy.stats import t  # noqa: PLC0415  (optional: a dev extra)

        return float(t.ppf(0.975, df))
    except ImportError:
        return _T95[df - 1] if df <= len(_T95) else 1.96 + 2.5 / df  # within 0.002 above 30


def seed_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample s.d., min, max and the 95% t-interval of the mean over seeds; `reached`
    counts the values that exist (None: a seed that never got there; then no mean)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    s: dict[str, Any] = {"n": len(values), "reached": len(v), "mean": None, "std": None,
                         "min": float(v.min()) if len(v) else None,
                         "max": float(v.max()) if len(v) else None, "ci95": None}  # fmt: skip
    if len(v) == len(values) and len(v):
        s["mean"] = float(v.mean())
        s["std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        if len(v) > 1:
            half = t95(len(v) - 1) * s["std"] / np.sqrt(len(v))
            s["ci95"] = [s["mean"] - half, s["mean"] + half]
    return s


def provenance(device: str = "cpu") -> dict[str, Any]:
    """What made a study's numbers: the git commit (when run from a checkout; `dirty` if the
    tree had uncommitted changes), torch, the machine and the date (benchmarks' machine_info)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                               timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    dev = resolve_device(device)
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status), **machine_info(dev)}


@dataclass(frozen=True)
class Row:
    """One row of a study: its folder name and label, the --set overrides it applies (if any),
    anything else its run function or table reads (`note`), and its own seeds (None: the
    study's)."""

    key: str
    label: str
    sets: tuple[str, ...] = ()
    note: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Metric:
    """A number each run returns (or `Study.derive` computes), summarised over seeds; shown in
    the table as value x scale with `digits` decimals."""

    key: str
    title: str
    scale: float = 1.0
    digits: int = 1


@dataclass
class Study:
    """A declaration: rows x seeds x budget; `spec(row, seed)` is what defines a run (a cached
    result is reused only if it matches), `run(row, seed, folder, spec)` trains one and returns
    its numbers; `derive(results)` adds per-seed values computed across runs (paired deltas)."""

    name: str
    out: str | Path
    rows: Sequence[Row]
    seeds: Sequence[int]
    budget: dict[str, Any]
    spec: Callable[[Row, int], dict[str, Any]]
    run: Callable[[Row, int, Path, dict[str, Any]], dict[str, Any]]
    metrics: Sequence[Metric]
    derive: Callable[[dict[str, list[dict]]], dict[str, dict[str, list]]] | None = None
    folder: Callable[[Row, int], str] = lambda row, seed: f"{row.key}-seed{seed}"  # noqa: E731
    device: str = "cpu"


def select_rows(text: str | None, keys: Sequence[str], flag: str,
                groups: dict[str, Sequence[str]] | None = None) -> tuple[str, ...]:  # fmt: skip
    """The row keys a comma list names (`--only lrn,pool`), a group name (`conv`, `all`)
    standing for its keys; in the order given, without repeats; () for no text."""
    groups = groups or {}
    picked: list[str] = []
    for k in (t.strip() for t in (text or "").split(",")):
        if k in groups:
            picked += groups[k]
        elif k in keys:
            picked.append(k)
        elif k:
            named = "".join(f"; {g} = " + ("every one" if list(v) == list(keys) else ",".join(v))
                            for g, v in groups.items())  # fmt: skip
            raise BadInput(f"{flag} {k!r}: valid rows are {', '.join(keys)}{named}")
    return tuple(dict.fromkeys(picked))


def paired_deltas(base_of: Callable[[str], str | None], deltas: dict[str, str],
                  scale: float = 100.0) -> Callable[[dict[str, list[dict]]], dict]:  # fmt: skip
    """A Study.derive: for each row that has a base row (`base_of(key)`), per seed, {delta key:
    scale x (the row's metric minus the base row's)}. Paired by seed: the same batches, views
    and (where the shapes agree) initial weights, so the seed's own noise cancels."""

    def derive(results: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
        return {key: {d: [scale * (r[m] - b[m]) for r, b in zip(rs, results[base], strict=True)]
                      for d, m in deltas.items()}
                for key, rs in results.items() if (base := base_of(key)) is not None}  # fmt: skip

    return derive


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


def cached_run(folder: Path, spec: dict[str, Any], fn: Callable[[Path], dict]) -> dict:
    """folder/result.json if it was made with this spec, else fn(folder)'s result, saved."""
    spec = json.loads(json.dumps(spec))  # as it reads back from JSON (tuples become lists)
    done = read_json(folder / "result.json")
    if done is not None and done.get("spec") == spec:
        return done
    result = {"spec": spec} | {k: v for k, v in fn(folder).items() if k != "spec"}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "result.json", result)
    return result


def run_study(study: Study) -> dict[str, list[dict[str, Any]]]:
    """Every (row, seed) run, seed-major (a stopped study has every row for its first seeds);
    returns {row key: [result per seed]}."""
    runs = Path(study.out) / "runs"
    todo = [(r, s) for s in sorted({s for r in study.rows for s in (r.seeds or study.seeds)})
            for r in study.rows if s in (r.seeds or study.seeds)]  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {r.key: [] for r in study.rows}
    bar = progress(len(todo), study.name, unit="run")
    for row, seed in todo:
        bar.set_postfix_str(f"{row.key} seed {seed}")
        spec = {"row": row.key, "seed": seed, **study.spec(row, seed)}
        fn = lambda folder: study.run(row, seed, folder, spec)  # noqa: B023, E731
        results[row.key].append(cached_run(runs / study.folder(row, seed), spec, fn))
        bar.update(1)
    bar.close()
    return results


def summarise_study(study: Study, results: dict[str, list[dict]]) -> dict[str, Any]:
    """Per row: each metric per seed and over seeds (seed_stats), with the provenance."""
    derived = study.derive(results) if study.derive else {}
    rows = []
    for row in study.rows:
        rs = results[row.key]
        mine = derived.get(row.key, {})
        # A metric this row has no value for (not returned, not derived) stays out of it.
        per = {m.key: mine.get(m.key, [r.get(m.key) for r in rs]) for m in study.metrics
               if m.key in mine or any(m.key in r for r in rs)}  # fmt: skip
        seeds = [r["spec"]["seed"] for r in rs]
        out = {"key": row.key, "label": row.label, "sets": list(row.sets), **row.note}
        out["per_seed"] = [{"seed": s} | {k: v[i] for k, v in per.items()}
                           for i, s in enumerate(seeds)]  # fmt: skip
        rows.append(out | {m.key: seed_stats(per[m.key]) if m.key in per else None
                           for m in study.metrics})  # fmt: skip
    return {"study": study.name, "provenance": provenance(study.device), "budget": study.budget,
            "seeds": list(study.seeds), "rows": rows}  # fmt: skip


def stats_cell(s: dict[str, Any], scale: float = 1.0, digits: int = 1) -> tuple[str, str]:
    """('mean (min-max)', '[lo, hi]') of seed_stats, scaled; a seed short: 'n of N reached'."""
    f = lambda v: f"{scale * v:.{digits}f}"  # noqa: E731
    if s is None:  # not a metric of this row
        return "-", "-"
    if s["mean"] is None:
        return f"{s['reached']} of {s['n']} reached", "-"
    mean = f(s["mean"]) + (f" ({f(s['min'])}-{f(s['max'])})" if s["n"] > 1 else "")
    ci = f"[{f(s['ci95'][0])}, {f(s['ci95'][1])}]" if s["ci95"] else "n/a (1 seed)"
    return mean, ci


def study_table(summary: dict[str, Any], metrics: Sequence[Metric],
                extra: Sequence[tuple[str, Callable[[dict], Any]]] = ()) -> str:  # fmt: skip
    """One line per row: per metric its mean (min-max over seeds) and its 95% t-interval; then
    the `extra` columns (title, function of the summary's row)."""
    header = ["row"]
    for m in metrics:
        header += [f"{m.title} mean (range)", f"{m.title} 95% CI"]
    header += [t for t, _ in extra]
    lines = []
    for r in summary["rows"]:
        line = [r["label"]]
        for m in metrics:
            line += stats_cell(r[m.key], m.scale, m.digits)
        lines.append(line + [fn(r) for _, fn in extra])
    return markdown_table(header, lines)


def plot_study(summary: dict[str, Any], metrics: Sequence[Metric], path: str | Path,
               title: str, ref: dict[str, dict[str, float]] | None = None) -> Path:  # fmt: skip
    """One panel per metric: per row the mean (dot), the 95% interval (thick bar) and the range
    over seeds (thin bar); `ref` {metric: {row key: value}} marks a reference (the paper's)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.4), squeeze=False)
    rows = summary["rows"]
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, r in enumerate(rows):
            s = r[m.key] or {"min": None, "ci95": None, "mean": None}
            if s["min"] is not None:
                ax.plot([i, i], [m.scale * s["min"], m.scale * s["max"]], color="grey", lw=1)
            if s["ci95"]:
                ax.plot([i, i], [m.scale * v for v in s["ci95"]], color="C0", lw=4, alpha=0.5)
            if s["mean"] is not None:
                ax.plot(i, m.scale * s["mean"], "o", color="C0")
            if ref and r["key"] in ref.get(m.key, {}):
                ax.plot(i, ref[m.key][r["key"]], "k*", ms=9)
        ax.set_xticks(range(len(rows)), [r["label"].split(" (")[0] for r in rows], rotation=30,
                      ha="right", fontsize=8)  # fmt: skip
        ax.set_title(m.title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    n = len(summary["seeds"])
    title = "\n".join(textwrap.fill(t, 45 * len(metrics)) for t in title.split("\n"))
    fig.suptitle(f"{title}\n{n} seed(s): dot mean, thick bar 95% t-interval, thin bar range"
                 + (", star: the paper" if ref else ""), fontsize=9)  # fmt: skip
    fig.tight_layout()
    return save_figure(fig, path)


def write_study(out: str | Path, name: str, summary: dict[str, Any], markdown: str,
                plot: Callable[[Path], Any]) -> None:  # fmt: skip
    """OUT/<name>.json (the numbers and their provenance), .md (the table), .png (the figure)."""
    out = Path(out)
    write_json(out / f"{name}.json", summary)
    write_text(out / f"{name}.md", markdown)
    plot(out / f"{name}.png")
