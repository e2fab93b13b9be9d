"""`alexnet finetune` (issue 13) at its smallest, on the Fashion-MNIST files: the two halves of the
classes, the pre-trained start of the fine-tuned arm, the budgets, the table, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alexnet.commands import main
from alexnet.data import open_store

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_finetune_quick(tmp_path, capsys):
    out = tmp_path / "ft"
    # 128 pre-training images (the quick mode: 640): the test checks the plumbing, not the gain
    argv = ["finetune", "--quick", "--out", str(out), "--budgets", "64", "--workers", "0",
            "--no-fast", "--pretrain-images", "128"]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((out / "finetune.json").read_text())
    a, b = open_store(out / "store-A-1500"), open_store(out / "store-B-1500")
    assert a.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert b.classes == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert s["target_classes"] == b.classes and s["layers_loaded"] == 14  # all but fc8
    for row in s["budgets"]:
        assert row["delta"] == [f - c for c, f in zip(row["scratch_top1"], row["finetuned_top1"],
                                                      strict=True)]  # fmt: skip
    # The fine-tuned run started from the pre-trained conv1; the scratch run did not.
    pre = load_file(out / "runs" / "pretrain-A" / "model.safetensors")
    tuned = json.loads((out / "runs" / "finetuned-64-seed0" / "config.json").read_text())
    scratch = json.loads((out / "runs" / "scratch-64-seed0" / "config.json").read_text())
    assert "conv1.weight" in tuned["derived"]["init"]["loaded"]
    assert "fc8.weight" in tuned["derived"]["init"]["not_loaded"]
    assert scratch["derived"]["init"] is None
    assert tuned["profile"]["train"]["epoch_images"] == 64
    assert tuned["run"]["init"].endswith("pretrain-A/model.safetensors")
    assert pre["conv1.weight"].shape == (96, 3, 11, 11)
    res = json.loads((out / "runs" / "finetuned-64-seed0" / "result.json").read_text())
    assert res["images_seen"] == 64 and res["val_images"] == 200
    md = (out / "finetune.md").read_text()
    assert "| 64 |" in md and "95% CI" in md and s["provenance"]["torch"] == torch.__version__
    # A rerun reuses every finished run.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert not torch.equal(pre["fc8.weight"][:1], torch.zeros(1, 4096))
    capsys.readouterr()
