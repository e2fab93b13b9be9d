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
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_model, load_model
from alexnet.model import build_model
from alexnet.speed import default_fast_mode
from conftest import one_line_error


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
    loader = data.make_eval_loader(
        store, loaded.run_info.profile.data, batch_size=5, views=10, workers=0
    )
    got = evaluate_model(loaded, loader, views=10)

    # Independently: each stored image minus the mean image, ten_crop, softmax, average (Sec. 4.1).
    labels = store.labels("val")
    probs = []
    with torch.no_grad():
        for i in range(store.size("val")):
            img = store.image("val", i).astype(np.float64) - store.stats.mean_image
            views = data.ten_crop(torch.from_numpy(img).permute(2, 0, 1).float(), 224)
            probs.append(loaded(views).softmax(1).mean(0).double())
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
    assert r["num_classes"] == 3  # the tiny store's: a reader knows top-5 means nothing here
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
        x = data.preprocess(r["path"], loaded.run_info.profile.data, loaded.run_info.stats)
        with torch.no_grad():
            p = loaded(x[None]).softmax(1)[0]
        assert preds[0]["class"] == loaded.run_info.classes[int(p.argmax())]
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
    assert len(loaded.run_info.classes) == 1000 and loaded.run_info.classes[0] == "tench"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))
    # torchvision's own preprocessing (Resize 256, CenterCrop 224, Normalize) gives the same input.
    tf = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256),
        torchvision.transforms.CenterCrop(224),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    img = Image.open(photos / "coffee.png").convert("RGB")
    ours = data.preprocess(
        photos / "coffee.png", loaded.run_info.profile.data, loaded.run_info.stats
    )
    assert (ours - tf(img)).abs().mean() < 0.05  # resampling filters differ slightly


def test_import_torchvision_rejects_foreign_files(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    assert cli_main(["import-torchvision", str(tmp_path / "x.pth"), str(tmp_path / "o")]) == 2
    torch.save({"a": torch.zeros(1)}, tmp_path / "y.pth")
    assert cli_main(["import-torchvision", str(tmp_path / "y.pth"), str(tmp_path / "o")]) == 2


def _weights(tiny_store, folder, seed, classes=None):
    """A randomly initialised paper net's weights file (3 classes), another seed each."""
    store = data.open_store(tiny_store)
    torch.manual_seed(seed)
    model = build_model("paper", num_classes=3)
    with torch.no_grad():
        model.fc8.weight.mul_(3)  # a softmax far from uniform
    tensors = dict(model.state_dict())
    tensors.update(stats_tensors(store.stats))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    meta = weights_metadata(get_profile("paper"), classes or store.classes)
    checkpoint.save_weights(path, tensors, meta)
    return path


def test_ensemble_is_the_average_of_softmaxes_over_views_then_networks(tiny_store, tmp_path):
    """Sec. 6's ensemble: per network the softmax averaged over the ten views (Sec. 4.1), then
    the mean over networks, computed here independently in float64 from the stored images."""
    from alexnet.evaluate import evaluate_networks

    nets = [_weights(tiny_store, tmp_path / f"n{s}", s) for s in (1, 2)]
    r = evaluate_networks(nets, tiny_store, views=10, fast=False, workers=0, batch_size=4)
    store = data.open_store(tiny_store)
    y = torch.from_numpy(store.labels("val"))
    per_net = []
    for path in nets:
        model = load_model(path)
        rows = []
        with torch.no_grad():
            for i in range(store.size("val")):
                img = store.image("val", i).astype(np.float64) - store.stats.mean_image
                views = data.ten_crop(torch.from_numpy(img).permute(2, 0, 1).float(), 224)
                rows.append(model(views).softmax(1).double().mean(0))
        per_net.append(torch.stack(rows))
    probs = (per_net[0] + per_net[1]) / 2
    e = r["ensemble"]
    assert e["networks"] == 2 and e["images"] == len(y) == 12 and r["views"] == 10
    assert e["top1_error"] == pytest.approx((probs.argmax(1) != y).double().mean().item())
    assert e["top5_error"] == 0.0  # 3 classes
    nll = -torch.log(probs[torch.arange(len(y)), y]).mean().item()
    assert e["loss"] == pytest.approx(nll, rel=1e-5)
    # Each member is reported on its own, with its own figures.
    for m, p in zip(r["members"], per_net, strict=True):
        assert m["top1_error"] == pytest.approx((p.argmax(1) != y).double().mean().item())
        assert m["loss"] == pytest.approx(-torch.log(p[torch.arange(len(y)), y]).mean().item(),
                                          rel=1e-5)  # fmt: skip
    assert r["top1_error"] == e["top1_error"] and r["memory"] == "one network resident at a time"
    # The ensemble is neither of its members.
    assert all(abs(e["loss"] - m["loss"]) > 1e-4 for m in r["members"])


def test_ensemble_refuses_networks_with_other_class_names(tiny_store, tmp_path, capsys):
    a = _weights(tiny_store, tmp_path / "a", 1)
    b = _weights(tiny_store, tmp_path / "b", 2, classes=["circle", "square", "zigzag"])
    rc = cli_main(["evaluate", str(a), str(b), "--data", str(tiny_store), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "share their classes" in err and "zigzag" in err and str(b) in err
    rc = cli_main(["predict", str(a), str(b), str(tmp_path / "x.png")])
    assert rc == 2


def test_predict_with_an_ensemble_averages_softmaxes(tiny_store, tmp_path, capsys):
    from alexnet.evaluate import predict_networks

    store = data.open_store(tiny_store)
    img = tmp_path / "img.png"
    Image.fromarray(store.image("val", 0)).save(img)
    nets = [_weights(tiny_store, tmp_path / f"n{s}", s) for s in (1, 2)]
    got = predict_networks(nets, [str(img), str(tmp_path / "missing.png")], topk=3, views=10)
    probs = []
    for path in nets:
        loaded = load_model(path)
        x = data.preprocess(str(img), loaded.run_info.profile.data, loaded.run_info.stats, views=10)
        with torch.no_grad():
            probs.append(loaded(x).softmax(1).double().mean(0))
    mean = (probs[0] + probs[1]) / 2
    expect = [store.classes[i] for i in mean.argsort(descending=True).tolist()]
    assert [p["class"] for p in got[0]["predictions"]] == expect
    for p in got[0]["predictions"]:
        assert p["probability"] == pytest.approx(mean[store.classes.index(p["class"])].item(),
                                                 abs=1e-6)  # fmt: skip
    assert len(got[0]["members"]) == 2 and got[1]["error"] == "no such file"
    # The command: networks first, then images.
    assert cli_main(["predict", str(nets[0]), str(nets[1]), str(img), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["predictions"][0]["class"] == expect[0]


@pytest.mark.slow
def test_evaluate_without_data_uses_the_runs_store(reference_run, tiny_store, tmp_path, capsys):
    assert cli_main(["evaluate", str(reference_run), "--json", "--workers", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["data"] == str(tiny_store.resolve()) and r["images"] == 12
    cfg = json.loads((reference_run / "config.json").read_text())
    cfg["derived"]["store"] = str(tmp_path / "gone")
    cfg["run"]["data"] = str(tmp_path / "gone")
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps(cfg))
    (moved / "model.safetensors").write_bytes((reference_run / "model.safetensors").read_bytes())
    assert cli_main(["evaluate", str(moved)]) == 2
    assert "no longer there" in capsys.readouterr().err


def test_predict_walks_folders_of_images_and_names_torch_files(random_weights, photos, tmp_path,
                                                                capsys):  # fmt: skip
    """Issue 20: `predict RUN photos/` predicts every image under the folder, recursively, in
    name order, skipping what is not an image; a PyTorch file where weights are expected is
    one line naming `alexnet import-torchvision`."""
    tree = tmp_path / "photos"
    (tree / "b" / "deep").mkdir(parents=True)
    (tree / ".cache").mkdir()
    (tree / "b" / "deep" / "cat.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    (tree / "a.png").write_bytes((photos / "coffee.png").read_bytes())
    (tree / "b" / "z.webp").write_bytes((photos / "astronaut.webp").read_bytes())
    (tree / "notes.txt").write_text("not an image")
    (tree / ".hidden.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    (tree / ".cache" / "thumb.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    (tmp_path / "empty").mkdir()
    # A run folder (it has model.safetensors) is a network; any other folder holds images.
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").symlink_to(random_weights)
    rc = cli_main(["predict", str(run), str(tree), str(tmp_path / "empty"), "--json",
                   "--topk", "1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    expect = [tree / "a.png", tree / "b" / "deep" / "cat.jpg", tree / "b" / "z.webp"]
    assert [r["path"] for r in out] == [*map(str, expect), str(tmp_path / "empty")]
    assert all("predictions" in r for r in out[:3]) and "without image files" in out[3]["error"]
    assert rc == 1  # the empty folder
    # torch.save's files, the zip (torch >= 1.6) and the legacy pickle, given as weights.
    torch.save({"w": torch.zeros(2)}, tmp_path / "new.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for f in (tmp_path / "new.pth", tmp_path / "old.pt"):
        with pytest.raises(BadInput, match="alexnet import-torchvision"):
            checkpoint.load_weights(f)  # what `train --init` and `evaluate` read with
        assert cli_main(["predict", str(f), str(tree / "a.png")]) == 2
        one_line_error(capsys.readouterr().err, f, "alexnet import-torchvision")
    with pytest.raises(BadInput, match="not a safetensors file"):  # not torch's: no hint
        (tmp_path / "x.bin").write_bytes(b"\x00" * 64)
        checkpoint.load_weights(tmp_path / "x.bin")


def test_evaluate_limit_is_class_balanced_and_top5_only_with_more_than_5_classes(
    tiny_store, random_weights, capsys
):
    """--val-limit N takes N / classes images of each class, even where the store is not sorted by
    class; with 3 classes no top-5 error is printed (it is 0 whatever the network)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000)  # unsorted, unequal classes, as Fashion-MNIST's test set
    idx = data.spread_indices(len(labels), 500, labels)
    assert len(idx) == 500 and len(set(idx.tolist())) == 500
    assert np.bincount(labels[idx], minlength=10).tolist() == [50] * 10
    small = np.array([0] * 3 + [1] * 40 + [2] * 40)  # a class smaller than its share
    assert sorted(np.bincount(small[data.spread_indices(83, 30, small)])) == [3, 13, 14]
    rc = cli_main(["evaluate", str(random_weights), "--data", str(tiny_store), "--workers", "0",
                   "--val-limit", "7", "--per-class"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "top-1 error" in out and "top-5" not in out
    counts = [int(line.split()[-2]) for line in out.splitlines()[-3:]]
    assert sorted(counts) == [2, 2, 3]  # the store: 4 val images per class
