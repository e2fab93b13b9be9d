"""Checkpoint files: round trips, atomic writes under a simulated crash, and refusing bad files."""

from __future__ import annotations

import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from torch import nn

from alexnet import checkpoint
from alexnet.checkpoint import (
    atomic_write,
    capture_rng_state,
    load_state,
    load_weights,
    restore_rng_state,
    save_state,
    save_weights,
)
from alexnet.config import PAPER
from alexnet.optim import LRSchedule, make_optimizer


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 5, generator=g)
    return {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "transposed": base.t(),  # not contiguous
        "half_a": base[:3],  # two views of one buffer
        "half_b": base[3:],
        "steps": torch.arange(7, dtype=torch.int64),
        "bf16": torch.randn(3, generator=g).to(torch.bfloat16),
    }


def test_weights_round_trip_with_metadata(tmp_path):
    tensors = _tensors()
    meta = {
        "profile": "paper",
        "classes": json.dumps(["T-shirt/top", "Trouser", "Pullover"]),
        "config": json.dumps({"train": {"lr": 0.01}}),
    }
    path = save_weights(tmp_path / "model.safetensors", tensors, meta)
    state, got = load_weights(path)
    assert set(state) == set(tensors)
    for k, t in tensors.items():
        assert state[k].dtype == t.dtype and torch.equal(state[k], t), k
    assert got == {**meta, "format": "alexnet-weights/1"}
    assert json.loads(got["classes"])[1] == "Trouser"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_weights_from_a_module(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    save_weights(tmp_path / "m.safetensors", model, {"profile": "x"})
    state, _ = load_weights(tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), model(x))


def test_weights_metadata_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match="str"):
        save_weights(tmp_path / "m.safetensors", _tensors(), {"classes": ["a", "b"]})
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_rename_crashes(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_weights(path, _tensors(0), {"profile": "old"})
    old_bytes = path.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_weights(path, _tensors(1), {"profile": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert load_weights(path)[1]["profile"] == "old"
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_crash_mid_write(tmp_path, error):
    path = tmp_path / "state.pt"
    save_state(path, {"epoch": 3})

    def half_then_crash(f):
        f.write(b"PK\x03\x04 half a zip file")
        raise error("simulated crash mid-write")

    with pytest.raises(error):
        atomic_write(path, half_then_crash)
    assert load_state(path) == {"epoch": 3}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_write_replaces_and_creates(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, lambda f: f.write(b"one"))
    atomic_write(path, lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["a.bin"]


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()[:32, :32]).save(buf, format="PNG")
    return buf.getvalue()


class _Evil:
    """Unpickling it would create a file: the marker of code run from a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_weights_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, _tensors(), {"profile": "paper"})
    whole = path.read_bytes()
    for n in (0, 5, 8, 40, len(whole) // 2, len(whole) - 1):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(whole[:n])
        with pytest.raises(ValueError) as e:
            load_weights(bad)
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg, msg
        assert ("empty" if n == 0 else "truncated") in msg, msg


def test_foreign_weights_are_refused(tmp_path):
    marker = tmp_path / "code-ran"
    foreign = {
        "png": _png_bytes(),
        "random": np.random.default_rng(0).bytes(4096),
        "pickle": pickle.dumps(_Evil(marker)),
        "text": b"hello, this is not a weights file\n" * 10,
    }
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    foreign["torch-save"] = buf.getvalue()
    for name, content in foreign.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError) as e:
            load_weights(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    # A valid safetensors file that is not ours (no "format" key).
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="format"):
        load_weights(other)
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unsupported format 'pt'"):
        load_weights(other)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)


def test_state_round_trip_with_rng_states(tmp_path):
    torch.manual_seed(1)
    model = _Net()
    opt = make_optimizer(model, PAPER.train)
    model.fc(model.conv1(torch.randn(2, 1, 4, 4)).flatten(1)).sum().backward()
    opt.step()
    sched = LRSchedule(PAPER.train, steps_per_epoch=10)
    sched.on_validation(1, 0.5)

    gen = torch.Generator().manual_seed(7)
    np_gen = np.random.default_rng(3)
    random.seed(5)
    np.random.seed(6)
    order = torch.randperm(10)
    state = {
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
        "rng": capture_rng_state(gen),
        "numpy_generator": np_gen.bit_generator.state,  # 128-bit Python ints
        "epoch": 3,
        "step": 1234,
        "position": {"order": order, "next": 4},
        "best": float("inf"),
    }
    # What each generator draws next, before and after a round trip through the file.
    expected = (
        torch.rand(3),
        torch.rand(3, generator=gen),
        random.random(),
        np.random.random(),
        np_gen.random(),
    )
    save_state(tmp_path / "state.pt", state)
    for _ in range(3):  # move every generator on
        torch.rand(5), torch.rand(5, generator=gen), random.random(), np.random.random()

    loaded = load_state(tmp_path / "state.pt")
    assert os.listdir(tmp_path) == ["state.pt"]
    assert loaded["epoch"] == 3 and loaded["step"] == 1234 and loaded["best"] == float("inf")
    assert torch.equal(loaded["position"]["order"], state["position"]["order"])
    assert loaded["schedule"] == sched.state_dict()
    v = loaded["optimizer"]["state"][0]["velocity"]
    assert torch.equal(v, opt.state_dict()["state"][0]["velocity"])
    restore_rng_state(loaded["rng"], gen)
    np_gen2 = np.random.default_rng()
    np_gen2.bit_generator.state = loaded["numpy_generator"]
    got = (torch.rand(3), torch.rand(3, generator=gen), random.random(), np.random.random(),
           np_gen2.random())  # fmt: skip
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[2:] == expected[2:]
    # The loaded optimiser state continues the run.
    opt2 = make_optimizer(model, PAPER.train)
    opt2.load_state_dict(loaded["optimizer"])


def test_bad_state_files_are_refused(tmp_path):
    path = tmp_path / "state.pt"
    save_state(path, {"epoch": 1, "weights": torch.randn(1000)})
    whole = path.read_bytes()
    marker = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({"x": _Evil(marker)}, buf)
    other = io.BytesIO()
    torch.save({"epoch": 1}, other)  # a torch file, but not ours
    cases = {
        "empty": b"",
        "truncated": whole[: len(whole) // 2],
        "almost": whole[:-10],
        "png": _png_bytes(),
        "random": np.random.default_rng(1).bytes(2048),
        "pickle": pickle.dumps(_Evil(marker)),
        "torch-evil": buf.getvalue(),
        "other": other.getvalue(),
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises(ValueError) as e:
            load_state(bad)
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg, (name, msg)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.pt")
