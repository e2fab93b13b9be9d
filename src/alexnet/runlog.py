"""What a training run shows and records: metrics.jsonl, TensorBoard, the progress bar, the
printed lines and curves.png. Only the main process (rank 0) writes.

metrics.jsonl holds one JSON object per logged step ({"kind": "step", "step", "epoch", "loss",
"lr", "images_per_s"}) and per epoch ({"kind": "epoch", "epoch", "val_top1_error", ...}). A
resumed run first cuts it back to the checkpoint it resumes (`truncate`): what was logged after
the checkpoint will be logged again. TensorBoard's event files are cut back alike (its
`purge_step`), so a re-run step is not drawn twice. Every TensorBoard scalar is drawn against
the training step, validation at the step where it ran (with `val/epoch`, the epoch it ended).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import scalar, text
from tqdm import tqdm

from alexnet.errors import BadInput, CannotWrite
from alexnet.fileio import write_text
from alexnet.plots import plot_curves


def shows_top5(num_classes: int | None) -> bool:
    """Whether a top-5 error is worth showing: only with more than 5 classes (with 5 or fewer
    the true class is always among the top 5, and the "error" is 0 whatever the network).
    None (the number is not known): shown, as before it was known."""
    return num_classes is None or num_classes > 5


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (the disk full, a quota, a read-only folder) as
    CannotWrite: one line naming the file."""
    try:
        yield
    except OSError as e:
        raise CannotWrite(f"cannot write {path}: {e.strerror or e}") from None


def read_metrics(path: str | Path, drop_torn_tail: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. An unparsable last line (a write cut short by a power
    loss or a full disk) is dropped with a warning when `drop_torn_tail`; any other unparsable
    line is an error naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or "kind" not in r:
                raise ValueError("not a metrics record")
        except ValueError:
            if drop_torn_tail and all(not x.strip() for x in lines[i + 1 :]):
                warnings.warn(f"{path}: dropped a torn last line ({line[:40]!r}...)", stacklevel=2)
                break
            raise BadInput(f"{path}, line {i + 1}: not a metrics record ({line[:60]!r})") from None
        records.append(r)
    return records


def _after_in_name_order(files: list[Path]) -> None:
    """Wait, if need be, until a new event file's name sorts after `files`. TensorBoard reads a
    folder's event files in name order, and a name starts with the second the file was made,
    then the host and the pid: a resumed run's file made in the same second as the killed
    run's, by a process with a smaller pid, would be read first and its purge applied before
    the events it has to purge (seen in CI: a kill at step 1, resumed within the second)."""
    seconds = [int(p.name.split(".")[3]) for p in files if p.name.split(".")[3].isdigit()]
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)


_EVENT_FILES = itertools.count()  # this process's event files, for unique names


class EventFile:
    """A TensorBoard event file, written in the calling thread and flushed at each call, so
    that a write that fails (a full disk) is CannotWrite where the run logs, one line.
    (torch's SummaryWriter writes from a thread of its own: there a full disk ended that
    thread with one traceback and the training loop, at its next write, with another.) The
    name and records are SummaryWriter's: TensorBoard reads the files in name order."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        host, pid, n = socket.gethostname(), os.getpid(), next(_EVENT_FILES)
        self.path = Path(folder) / f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}.{n}"
        self._records: RecordWriter | None = None
        with _writing(self.path):
            self._records = RecordWriter(open(self.path, "xb"))  # noqa: SIM115 (closed in close)
        self._add(Event(file_version="brain.Event:2"))
        if purge_step is not None:
            # TensorBoard drops the events of this folder's earlier files from purge_step on.
            self._add(Event(step=purge_step, file_version="brain.Event:2"))
            self._add(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _add(self, event: Event) -> None:
        if self._records is None:
            return  # closed after a failed write
        if not event.wall_time:
            event.wall_time = time.time()
        with self._failing_closes():
            self._records.write(event.SerializeToString())

    @contextlib.contextmanager
    def _failing_closes(self) -> Iterator[None]:
        """A failed write closes the file (its error once, not again at close) and raises
        CannotWrite."""
        try:
            with _writing(self.path):
                yield
        except CannotWrite:
            records, self._records = self._records, None
            with contextlib.suppress(OSError):
                records.close()
            raise

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._add(Event(step=int(step), summary=scalar(tag, value)))

    def add_text(self, tag: str, value: str, step: int) -> None:
        self._add(Event(step=int(step), summary=text(tag, value)))

    def flush(self) -> None:
        if self._records is not None:
            with self._failing_closes():
                self._records.flush()

    def close(self) -> None:
        if self._records is not None:
            self.flush()
            records, self._records = self._records, None
            with _writing(self.path):
                records.close()


class RunLog:
    """The observability of one run (see the module docstring). `main`: rank 0, which writes."""

    def __init__(
        self, out: Path, main: bool = True, bars: bool | None = None, num_classes: int | None = None
    ):
        self.out, self.main = Path(out), main
        self.num_classes = num_classes  # the top-5 error is shown only where it means something
        self.bars = main and (sys.stderr.isatty() if bars is None else bars)
        # A line per logged step wherever there is no bar, and in what stdout goes to when it
        # is not a terminal (a file, a pipe, nohup), even while a bar shows on stderr: the log
        # keeps what the bar showed only on the screen.
        self.lines = main and (not self.bars or not sys.stdout.isatty())
        self.tb = None
        self.metrics = self.out / "metrics.jsonl"

    def open(self, step: int = 0) -> None:
        """TensorBoard for the steps after `step` (the checkpoint's). When the folder already
        has event files (a resumed run, or one started over), their events of those steps are
        purged (TensorBoard drops every event from `purge_step` on), as they will be logged
        again."""
        if not self.main:
            return
        earlier = list(self.out.glob("events.out.tfevents.*"))
        if earlier:
            _after_in_name_order(earlier)
        self.tb = EventFile(self.out, purge_step=step + 1 if earlier else None)

    def close(self) -> None:
        if self.tb is not None:
            tb, self.tb = self.tb, None
            tb.close()

    def truncate(self, epochs_done: int, step: int) -> None:
        """Drop what was logged after the checkpoint being resumed: it will run again."""
        if not self.main or not self.metrics.exists():
            return

        def before(r: dict) -> bool:
            if r["kind"] == "epoch":
                return r["epoch"] <= epochs_done
            return r["step"] <= step

        keep = [r for r in read_metrics(self.metrics, drop_torn_tail=True) if before(r)]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def _append(self, rec: dict[str, Any]) -> None:
        with _writing(self.metrics), open(self.metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def bar(self, total: int, initial: int, desc: str):
        """A tqdm bar on a terminal (stderr), else None; step() prints its lines (self.lines)."""
        if not self.bars:
            return None
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def header(self, text: str) -> None:
        """The run's first line (what runs: Trainer.describe), before its first step."""
        if self.main:
            print(text, flush=True)

    def step(self, rec: dict[str, Any], bar) -> None:
        if not self.main:
            return
        self._append(rec)
        step, loss, lr, rate = rec["step"], rec["loss"], rec["lr"], rec["images_per_s"]
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/images_per_s", rate, step)
            self.tb.flush()  # a full disk is an error now, not in a minute
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}", img_s=f"{rate:.0f}")
        if bar is None or self.lines:
            print(
                f"epoch {rec['epoch']:.3f} step {step} loss {loss:.4f} lr {lr:.3g} "
                f"{rate:.1f} img/s",
                flush=True,
            )

    def epoch(self, rec: dict[str, Any], at_chance: bool) -> None:
        if not self.main:
            return
        self._append(rec)
        epoch = rec["epoch"]
        top5 = shows_top5(self.num_classes)
        if self.tb is not None:
            # One step axis for every scalar: validation is drawn at the training step where it
            # ran (the record's "step"), beside train/*, not at the epoch number (which put epoch
            # 3's validation at step 3). A record without a step (older callers): the epoch.
            step = rec.get("step", epoch)
            for k in ("val_loss", "val_top1_error") + (("val_top5_error",) if top5 else ()):
                self.tb.add_scalar(f"val/{k[4:]}", rec[k], step)
            self.tb.add_scalar("val/epoch", epoch, step)  # which epoch ended at that step
            self.tb.add_scalar("val/at_chance", float(at_chance), step)
            if rec.get("warning"):
                self.tb.add_text("warning", rec["warning"], step)
            self.tb.flush()
        print(
            f"epoch {epoch}: val top-1 error {rec['val_top1_error']:.2%}, "
            + (f"top-5 {rec['val_top5_error']:.2%}, " if top5 else "")
            + f"loss {rec['val_loss']:.4f}"
            + ("  (lr divided by 10)" if rec["lr_dropped"] else ""),
            flush=True,
        )
        if rec.get("warning"):
            print(f"WARNING: {rec['warning']}", file=sys.stderr, flush=True)
        with _writing(self.out / "curves.png"):
            plot_curves(read_metrics(self.metrics), self.out / "curves.png", top5=top5)

    def epoch_train_loss(self, epoch: int) -> float | None:
        """The mean training loss of epoch `epoch` (1-based) over its steps: each logged mean
        weighted by the steps it covers (step 1 is logged alone, and the window before an
        epoch's end may be short; a record without "steps", from an older run, counts 1)."""
        recs = [(r["loss"], r.get("steps", 1)) for r in read_metrics(self.metrics)
                if r.get("kind") == "step" and epoch - 1 < r["epoch"] <= epoch]  # fmt: skip
        n = sum(w for _, w in recs)
        return sum(v * w for v, w in recs) / n if n else None
