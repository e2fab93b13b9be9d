"""Small helpers shared by the experiment commands: Markdown tables, progress bars, and one
resumable training run per experiment row."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alexnet.fileio import read_json, write_json
from alexnet.train import Trainer


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def progress(total: int, desc: str, unit: str = "step", disable: bool | None = None):
    """A tqdm bar on stderr (shown on a terminal; silent in tests and logs unless asked)."""
    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)


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
