"""Small helpers shared by the experiment commands: atomic JSON/text writes, tables, bars."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from alexnet.checkpoint import atomic_write


def _readable(path: Path) -> Path:
    """atomic_write's temporary files are private (0600); results are ordinary files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """JSON written atomically (a reader, or a resumed run, never sees half a file)."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    return _readable(atomic_write(path, lambda f: f.write(text.encode())))


def write_text(path: str | Path, text: str) -> Path:
    return _readable(atomic_write(path, lambda f: f.write(text.encode())))


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def progress(total: int, desc: str, unit: str = "step", disable: bool | None = None):
    """A tqdm bar on stderr (shown on a terminal; silent in tests and logs unless asked)."""
    from tqdm import tqdm

    if disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=disable)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def train_or_resume(folder: str | Path, spec: dict[str, Any], profile, run):
    """Train one experiment run in `folder` until run.max_steps (or the recipe's end), resuming
    an interrupted run of the same `spec` from its checkpoint; any other content of the folder
    (a different spec, or no checkpoint yet) is removed and the run starts over. Returns the
    Trainer (its model holds the final weights). Ctrl-C: checkpoint, then KeyboardInterrupt."""
    from alexnet.train import Trainer

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
