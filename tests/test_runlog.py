"""What a run shows (alexnet.runlog), without training: the epoch line and TensorBoard's axes."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet import plots
from alexnet.runlog import RunLog
from conftest import tensorboard_steps


def _epoch(epoch: int, step: int) -> dict:
    return {"kind": "epoch", "epoch": epoch, "step": step, "val_loss": 1.0,
            "val_top1_error": 0.5, "val_top5_error": 0.0, "val_images": 12, "lr": 0.01,
            "lr_dropped": False, "lr_drops": []}  # fmt: skip


def test_validation_is_drawn_at_its_step_and_top5_only_with_more_than_5_classes(tmp_path, capsys):
    """Issue 20: TensorBoard drew train/* against the step and val/* against the epoch (the
    validation of epoch 2, after step 8, sat at step 2); with 3 classes the top-5 error (always
    0) was printed and drawn."""
    for classes, top5 in ((3, False), (10, True)):
        out = tmp_path / str(classes)
        out.mkdir()
        log = RunLog(out, bars=False, num_classes=classes)
        log.open()
        for step in range(1, 9):
            log.step({"kind": "step", "step": step, "epoch": step / 4, "loss": 1.0, "lr": 0.01,
                      "images_per_s": 1.0}, None)  # fmt: skip
            if step % 4 == 0:
                log.epoch(_epoch(step // 4, step), at_chance=False)
        log.close()
        printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 2:")]
        assert printed == [
            "epoch 2: val top-1 error 50.00%, " + ("top-5 0.00%, " if top5 else "") + "loss 1.0000"
        ]
        assert tensorboard_steps(out) == list(range(1, 9))
        assert tensorboard_steps(out, "val/top1_error") == [4, 8]
        assert tensorboard_steps(out, "val/epoch") == [4, 8]
        acc = EventAccumulator(str(out))
        acc.Reload()
        assert ("val/top5_error" in acc.Tags()["scalars"]) == top5


class _Bar:
    """What RunLog.step asks of a tqdm bar."""

    def __init__(self):
        self.postfix = None

    def set_postfix(self, **kw):
        self.postfix = kw


def test_step_lines_go_to_a_log_even_while_a_bar_shows(tmp_path, capsys, monkeypatch):
    """Issue 20: with a bar on the terminal (stderr) and stdout to a file or a pipe, the log
    got no step line at all; on a terminal the bar alone shows them."""
    rec = {"kind": "step", "step": 1, "epoch": 0.25, "loss": 1.0986, "lr": 0.01,
           "images_per_s": 12.0}  # fmt: skip
    for stdout_tty, printed in ((False, True), (True, False)):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=stdout_tty: tty)
        out = tmp_path / str(stdout_tty)
        out.mkdir()
        log, bar = RunLog(out, bars=True, num_classes=3), _Bar()
        log.step(rec, bar)
        assert bar.postfix["loss"] == "1.099"
        lines = capsys.readouterr().out.splitlines()
        assert lines == (["epoch 0.250 step 1 loss 1.0986 lr 0.01 12.0 img/s"] if printed else [])


def test_curves_draw_top5_only_with_more_than_5_classes(tmp_path, monkeypatch):
    """Issue 21: curves.png drew a flat top-5 line at 0 for a 3-class run."""
    drawn = {}

    def keep(fig, path, dpi=110):
        drawn[path.parent.name] = [ln.get_label() for ax in fig.axes for ln in ax.get_lines()]
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    for classes in (3, 5, 6):
        out = tmp_path / str(classes)
        out.mkdir()
        log = RunLog(out, bars=False, num_classes=classes)
        log.step({"kind": "step", "step": 4, "epoch": 1.0, "loss": 1.0, "lr": 0.01,
                  "images_per_s": 1.0}, None)  # fmt: skip
        log.epoch(_epoch(1, 4), at_chance=False)
    assert {k: "val top-5 error" in v for k, v in drawn.items()} == {"3": False, "5": False,
                                                                     "6": True}  # fmt: skip
    assert all("val top-1 error" in v for v in drawn.values())


def test_epoch_train_loss_is_the_mean_over_its_steps(tmp_path):
    """Issue 21's quick re-run: with step 1 logged alone, the epoch's train_loss (the mean of
    the logged means) gave step 1 the weight of a whole window. Each logged mean now counts for
    the steps it covers: in an epoch of 8 steps logged every 4, windows of 1, 4 and 3 steps with
    means 3.0, 2.0 and 1.0 give (3 + 8 + 3) / 8 = 1.75, where the plain mean was 2.0."""
    log = RunLog(tmp_path, bars=False, num_classes=3)
    for step, loss, n in ((1, 3.0, 1), (5, 2.0, 4), (8, 1.0, 3), (9, 0.5, 1)):
        log.step({"kind": "step", "step": step, "epoch": step / 8, "loss": loss, "steps": n,
                  "lr": 0.01, "images_per_s": 1.0}, None)  # fmt: skip
    assert log.epoch_train_loss(1) == 1.75 and log.epoch_train_loss(2) == 0.5
    assert log.epoch_train_loss(3) is None
