"""Shared fixtures: a tiny prepared store built from generated images (session-scoped)."""

from __future__ import annotations

import contextlib
import os
import signal

# The LRN's compiled kernels are checked against the formula in test_lrn.py; everywhere else the
# eager form keeps the tests fast (no compilation per shape) and their numerics independent of
# which shapes an earlier test compiled in the same process.
os.environ.setdefault("ALEXNET_LRN", "eager")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alexnet.config import apply_overrides, get_profile
from alexnet.data import prepare_store
from alexnet.train import RunConfig, Trainer


def make_image_tree(root: Path, classes=("circle", "square", "stripes"), per_class=12, seed=0):
    """An ImageFolder tree (train/<class>, val/<class>) of small, learnable, coloured pictures."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:80, 0:96]
    for split, n in (("train", per_class), ("val", max(2, per_class // 3))):
        for ci, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (80, 96, 3)).astype(np.float64)
                cy, cx = rng.integers(25, 55), rng.integers(25, 70)
                if ci == 0:
                    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 18**2
                elif ci == 1:
                    mask = (abs(yy - cy) < 15) & (abs(xx - cx) < 15)
                else:
                    mask = (xx // 8) % 2 == 0
                img[mask] += np.array([200, 120 + 40 * ci, 60 * ci])[None, :] * rng.uniform(0.8, 1)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A prepared store: 3 classes, 36 train and 12 val images, 256x256 as the paper."""
    root = tmp_path_factory.mktemp("tiny")
    make_image_tree(root / "src")
    store = root / "store"
    prepare_store(root / "src", store, kind="folder", workers=1, progress=False)
    return store


# The reference training run: 36 train images / batch 8 = 4 steps per epoch; 2 epochs = 8 steps.
# As command-line flags (for the runs that tests start as processes) and as the library's
# configuration (reference_config): the two must be the same run.
TRAIN_ARGS = [
    "--profile", "paper", "--epochs", "2", "--batch-size", "8", "--seed", "3", "--no-fast",
    "--log-every", "1", "--val-limit", "6", "--workers", "0", "--set", "train.lr=0.001",
]  # fmt: skip


@pytest.fixture(scope="session")
def reference_run(tiny_store, tmp_path_factory):
    """The uninterrupted one-process run that resumed and data-parallel runs must match."""
    out = tmp_path_factory.mktemp("ref") / "run"
    profile, run = reference_config(tiny_store, out)
    assert Trainer(profile, run).fit()["status"] == "done"
    return out


def reference_config(store: Path, out: Path) -> tuple:
    """TRAIN_ARGS as the library's (profile, RunConfig)."""
    sets = ["train.epochs=2", "train.batch_size=8", "train.lr=0.001"]
    profile = apply_overrides(get_profile("paper"), sets)
    run = RunConfig(data=str(store), out=str(out), seed=3, fast=False, log_every=1, val_limit=6,
                    workers=0)  # fmt: skip
    return profile, run


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging: for the tests of what used to block forever."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line_error(err: str, *names: str) -> str:
    """The user error a command printed on stderr: one line `alexnet CMD: error: ...`, the last
    one (a message of several lines would end in another), naming each of `names`; never a
    traceback."""
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if ": error: " in x]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{err}"
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def tensorboard_steps(run: Path, tag: str = "train/loss") -> list[int]:
    """The steps of a scalar in a run's TensorBoard events, as TensorBoard shows them (orphaned
    events of a run that was resumed purged)."""
    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]
