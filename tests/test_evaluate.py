"""Evaluation (the ten-view test of Sec. 4.1), prediction on real photos, torchvision import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import alexnet.data as data
from alexnet import checkpoint
from alexnet.checkpoint import stats_tensors, weights_metadata
from alexnet.commands import main as cli_main
from alexnet.config import get_profile
from alexnet.evaluate import evaluate_model, load_model
from alexnet.model import build_model
from alexnet.speed import default_fast_mode


@pytest.fixture(scope="module")
def random_weights(tiny_store, tmp_path_factory):
    """Weights of a freshly initialised paper net for the tiny store (3 classes)."""
    store = data.open_store(tiny_store)
    torch.manual_seed(0)
    model = build_model("paper", num_classes=3)
    # Scale fc8 up so the softmax is far from uniform and the views disagree.
    with torch.no_grad():
        model.fc8.weight.mul_(3)
    tensors = dict(model.state_dict())
    tensors.update(stats_tensors(store.stats))
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    checkpoint.save_weights(path, tensors, weights_metadata(get_profile("paper"), store.classes))
    return path


def test_ten_view_evaluation_matches_an_independent_computation(tiny_store, random_weights):
    store = data.open_store(tiny_store)
    loaded = load_model(random_weights)
    loader = data.make_eval_loader(store, loaded.profile.data, batch_size=5, views=10, workers=0)
    got = evaluate_model(loaded.model, loader, views=10)

    # Independently: each stored image minus the mean image, ten_crop, softmax, average (Sec. 4.1).
    labels = store.labels("val")
    probs = []
    with torch.no_grad():
        for i in range(store.size("val")):
            img = store.image("val", i).astype(np.float64) - store.stats.mean_image
            views = data.ten_crop(torch.from_numpy(img).permute(2, 0, 1).float(), 224)
            probs.append(loaded.model(views).softmax(1).mean(0).double())
    probs = torch.stack(probs)
    y = torch.from_numpy(labels)
    top1 = (probs.argmax(1) != y).double().mean().item()
    top3 = probs.topk(3, 1).indices
    nll = -torch.log(probs[torch.arange(len(y)), y]).mean().item()
    assert got["images"] == len(y) and got["views"] == 10
    assert got["top1_error"] == pytest.approx(top1)
    assert got["top5_error"] == pytest.approx(
        1 - (top3 == y[:, None]).any(1).double().mean().item()
    )
    assert got["loss"] == pytest.approx(nll, rel=1e-4)


def test_evaluate_command_json(tiny_store, random_weights, capsys):
    rc = cli_main(["evaluate", str(random_weights), "--data", str(tiny_store), "--json",
                   "--views", "10", "--workers", "0", "--per-class"])  # fmt: skip
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("top1_error", "top5_error", "loss", "views", "images"):
        assert key in r
    assert r["views"] == 10 and r["images"] == 12
    assert len(r["per_class_top1_error"]) == 3
    assert r["mode"] == default_fast_mode(torch.device("cpu")).label  # as training validates
    # --no-fast: float32, the independent computation's arithmetic.
    rc = cli_main(["evaluate", str(random_weights), "--data", str(tiny_store), "--json",
                   "--workers", "0", "--no-fast"])  # fmt: skip
    assert rc == 0
    r32 = json.loads(capsys.readouterr().out)
    assert r32["mode"] == "fp32" and r32["images"] == 12


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data as skdata

    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.chelsea()).save(d / "chelsea.jpg", quality=90)
    Image.fromarray(skdata.coffee()).save(d / "coffee.png")
    Image.fromarray(skdata.astronaut()).save(d / "astronaut.webp")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return d


def test_predict_real_photos_and_a_broken_file(random_weights, photos, capsys):
    paths = [photos / "chelsea.jpg", photos / "broken.jpg", photos / "coffee.png",
             photos / "astronaut.webp", photos / "missing.jpg"]  # fmt: skip
    rc = cli_main(["predict", str(random_weights), *map(str, paths), "--json", "--topk", "2"])
    assert rc != 0  # a file failed
    out = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in out] == [str(p) for p in paths]
    assert out[4]["error"] == "no such file"
    assert out[1]["error"] and str(paths[1]) not in out[1]["error"]  # the reason, once
    # Without --json: one line per failed file, naming it once, on stderr.
    assert cli_main(["predict", str(random_weights), str(paths[1]), str(paths[4])]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{paths[1]}: error: {out[1]['error']}", f"{paths[4]}: error: no such file"]
    loaded = load_model(random_weights)
    for r in (out[0], out[2], out[3]):
        preds = r["predictions"]
        assert len(preds) == 2 and preds[0]["probability"] >= preds[1]["probability"]
        # Against the model on the paper's preprocessing of the same file.
        x = data.preprocess(r["path"], loaded.profile.data, loaded.stats)
        with torch.no_grad():
            p = loaded.model(x[None]).softmax(1)[0]
        assert preds[0]["class"] == loaded.classes[int(p.argmax())]
        assert preds[0]["probability"] == pytest.approx(float(p.max()), rel=1e-4)


def test_import_torchvision_round_trip(tmp_path, photos):
    torch.manual_seed(0)
    ref = torchvision.models.alexnet().eval()  # locally made: no download
    torch.save(ref.state_dict(), tmp_path / "alexnet-owt.pth")
    assert (
        cli_main(["import-torchvision", str(tmp_path / "alexnet-owt.pth"), str(tmp_path / "tv")])
        == 0
    )  # noqa: E501
    loaded = load_model(tmp_path / "tv")
    assert len(loaded.classes) == 1000 and loaded.classes[0] == "tench"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ref(x))
    # torchvision's own preprocessing (Resize 256, CenterCrop 224, Normalize) gives the same input.
    tf = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    img = Image.open(photos / "coffee.png").convert("RGB")
    ours = data.preprocess(photos / "coffee.png", loaded.profile.data, loaded.stats)
    assert (ours - tf(img)).abs().mean() < 0.05  # resampling filters differ slightly


def test_import_torchvision_rejects_foreign_files(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    assert cli_main(["import-torchvision", str(tmp_path / "x.pth"), str(tmp_path / "o")]) == 2
    torch.save({"a": torch.zeros(1)}, tmp_path / "y.pth")
    assert cli_main(["import-torchvision", str(tmp_path / "y.pth"), str(tmp_path / "o")]) == 2
