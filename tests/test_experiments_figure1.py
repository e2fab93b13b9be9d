"""`alexnet figure1`: the four-layer net, the training-error curves, the threshold crossing and
the ratio, checked against hand counts and independent recomputation from the JSON."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.data.sources import read_idx
from alexnet.experiments import cifar_nets as N
from alexnet.experiments import figure1 as F1

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist missing"
)


def test_four_layer_net_shapes_and_parameters():
    for cin in (1, 3):
        net = N.FourLayerNet(cin, 10, "relu")
        # Hand count: three 5x5 convs (32, 32, 64 kernels) with biases, fc 64*4*4 -> 10.
        expected = (cin * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 25 * 64 + 64)
        expected += 64 * 4 * 4 * 10 + 10
        assert sum(p.numel() for p in net.parameters()) == expected
        x = torch.randn(2, cin, 32, 32)
        # cuda-convnet pooling rounds up: 32 -> 16 -> 8 -> 4.
        h = net.pool1(torch.relu(net.conv1(x)))
        assert h.shape[-2:] == (16, 16)
        h = net.pool3(torch.relu(net.conv3(net.pool2(torch.relu(net.conv2(h))))))
        assert h.shape[1:] == (64, 4, 4)
        assert net(x).shape == (2, 10)
    # The same seed gives the same initial weights for both activations (a fair comparison).
    torch.manual_seed(3)
    a = N.FourLayerNet(1, 10, "relu")
    torch.manual_seed(3)
    b = N.FourLayerNet(1, 10, "tanh")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="activation"):
        N.FourLayerNet(1, 10, "sigmoid")


def test_layers_80sec_net_and_its_init():
    """--net layers-80sec: the 2012 file's five weighted layers (fc64 before fc10) and its init
    (std 1e-4 conv1, 0.01 conv2-3, 0.1 fc64 and fc10, biases 0); its inputs are not divided."""
    torch.manual_seed(0)
    net = N.Layers80SecNet(3, 10, "tanh")
    convs = (3 * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 25 * 64 + 64)
    assert sum(p.numel() for p in net.parameters()) == convs + (1024 * 64 + 64) + (64 * 10 + 10)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for name, std in (("conv1", 1e-4), ("conv2", 0.01), ("conv3", 0.01), ("fc64", 0.1),
                      ("fc", 0.1)):  # fmt: skip
        w = getattr(net, name).weight.detach()
        assert float(w.std()) == pytest.approx(std, rel=0.1) and abs(float(w.mean())) < std / 5
        assert not getattr(net, name).bias.any()
    imgs = np.arange(2 * 4, dtype=np.uint8).reshape(2, 1, 2, 2) * 10
    raw = N.normalise(imgs, by_std=False)  # raw pixels minus the mean image (the 2012 code)
    assert torch.equal(raw, torch.from_numpy(imgs.astype(np.float32) - imgs.mean(0)))
    assert float(N.normalise(imgs).std(correction=0)) == pytest.approx(1.0, rel=1e-5)


def test_read_idx(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 4) + arr.tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "b").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")


def test_training_error_is_the_error_on_the_batches_trained_on():
    """With lr 0 the net never changes, so an epoch's windows together hold the error of the
    initial net on every training image: compare with a direct forward pass."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 32, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    spec = N.RunSpec("synthetic", 256, "tanh", 0.0, 5, 1, 64, 2)
    r = N.train_run(spec, x, y)
    assert r["epochs"] == [0.5, 1.0]
    torch.manual_seed(5)
    net = N.FourLayerNet(1, 10, "tanh")
    with torch.no_grad():
        err = float((net(x).argmax(1) != y).float().mean())
    assert np.mean(r["errors"]) == pytest.approx(err, abs=1e-9)
    assert r["seconds"][0] <= r["seconds"][1]


def crossing(epochs, errors, th):
    """Independent reference: the first point at or below the threshold."""
    for e, v in zip(epochs, errors, strict=True):
        if v is not None and v <= th:
            return e
    return None


@needs_fashion
@pytest.mark.slow  # reads the 60,000 Fashion-MNIST images and trains 8 small runs (~10 s)
def test_figure1_json_curves_ratio_and_resume(tmp_path):
    cfg = F1.Figure1Config(
        out=str(tmp_path / "f1"),
        seeds=2,
        epochs=2,
        threshold=0.8,
        batch_size=64,
        train_images=512,
        points_per_epoch=2,
        lr_grid=(0.01, 0.05),
        lr={"relu": None, "tanh": 0.05},
        quiet=True,
    )
    r = F1.run_figure1(cfg)
    data = json.loads((tmp_path / "f1" / "figure1.json").read_text())
    assert data["dataset"] == "fashion-mnist" and data["threshold"] == 0.8
    for act in ("relu", "tanh"):
        c = data["curves"][act]
        assert c["epochs"] == [0.5, 1.0, 1.5, 2.0]
        assert sorted(c["train_error"]) == ["0", "1"]
        for errs in c["train_error"].values():
            assert len(errs) == 4 and all(0 <= e <= 1 for e in errs)
        # epochs to threshold recomputed from the curves, per seed and on average
        per_seed = [crossing(c["epochs"], c["train_error"][s], 0.8) for s in ("0", "1")]
        assert data["to_threshold"][act]["epochs_per_seed"] == per_seed
        if None not in per_seed:
            assert data["to_threshold"][act]["epochs"]["mean"] == pytest.approx(np.mean(per_seed))
    # The lr search picked, for ReLU, the rate whose seed-0 run has the lowest mean training
    # error; tanh kept its fixed rate.
    runs = {
        lr: json.loads(
            next((tmp_path / "f1" / "runs").glob(f"relu-lr{lr:g}-seed0-*/result.json")).read_text()
        )  # fmt: skip
        for lr in (0.01, 0.05)
    }

    def key(run):
        return np.inf if run["diverged"] else np.mean(run["errors"])

    assert data["lr"]["relu"] == min(runs, key=lambda lr: key(runs[lr]))
    assert data["lr"]["tanh"] == 0.05 and data["lr_search"]["tanh"].startswith("fixed")
    assert [t["lr"] for t in data["lr_search"]["relu"]] == [0.01, 0.05]
    # The ratio is tanh's mean epochs over ReLU's.
    rm = data["to_threshold"]["relu"]["epochs"]["mean"]
    tm = data["to_threshold"]["tanh"]["epochs"]["mean"]
    if rm and tm:
        assert data["ratio"]["epochs"] == pytest.approx(tm / rm)
    else:
        assert data["ratio"]["epochs"] is None
    # The reported crossing of every seed is recomputed for the bounds too.
    for act in ("relu", "tanh"):
        t = data["to_threshold"][act]
        assert t["epochs"]["reached"] == sum(v is not None for v in t["epochs_per_seed"])
    assert data["ratio"]["paper"] == 6.0
    md = (tmp_path / "f1" / "figure1.md").read_text()
    assert "| ReLU |" in md and "| tanh |" in md and "Ratio tanh / ReLU" in md
    png = Image.open(tmp_path / "f1" / "figure1.png")
    assert png.size[0] > 800 and png.size[1] > 300

    # Resumable: a rerun reuses every cached run (none is retrained) and gives the same JSON.
    files = sorted((tmp_path / "f1" / "runs").glob("*/result.json"))
    assert len(files) == 5  # relu: 2 rates (seed 0) + seed 1; tanh: 2 seeds
    mtimes = [f.stat().st_mtime_ns for f in files]
    r2 = F1.run_figure1(cfg)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert r2["curves"] == r["curves"] and r2["ratio"] == r["ratio"]


def test_load_cifar10_python_batches(tmp_path):
    """The python batches' row layout: 1024 red values, then green, then blue, row-major."""
    import pickle

    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rows = []
    for k in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        rows.append(data)
        batch = {b"data": data, b"labels": [k % 10] * 4}
        (d / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
    images, labels = F1.load_cifar10(tmp_path)  # the parent folder works too
    assert images.shape == (20, 3, 32, 32) and labels.tolist() == sum(
        ([k % 10] * 4 for k in range(1, 6)), []
    )
    r = rows[2][1]  # batch 3, image 1 = image 9
    for c, y, x in ((0, 0, 0), (1, 5, 7), (2, 31, 30)):
        assert images[9, c, y, x] == r[c * 1024 + y * 32 + x]
    (d / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        F1.load_cifar10(d)


def _run(seed, act, errors, step=1.0):
    epochs = [step * (i + 1) for i in range(len(errors))]
    return {
        "spec": {"seed": seed, "activation": act},
        "epochs": epochs,
        "errors": errors,
        "seconds": [10 * e for e in epochs],
        "diverged": False,
        "device": "cpu",
    }


def test_ratio_and_its_bounds_when_a_net_falls_short():
    cfg = F1.Figure1Config(seeds=2, epochs=4, threshold=0.25)
    relu = [_run(0, "relu", [0.5, 0.2, 0.1, 0.1]), _run(1, "relu", [0.3, 0.24, 0.2, 0.1])]
    # both reach: seeds cross at 2.0/2.0 (ReLU) and 3.0/4.0 (tanh): ratio 3.5 / 2
    tanh = [_run(0, "tanh", [0.6, 0.4, 0.25, 0.2]), _run(1, "tanh", [0.6, 0.5, 0.3, 0.2])]
    s = F1.summarise(
        cfg, "x", "x", 100, {"relu": 0.1, "tanh": 0.1}, {}, {"relu": relu, "tanh": tanh}
    )
    assert s["to_threshold"]["relu"]["epochs_per_seed"] == [2.0, 2.0]
    assert s["to_threshold"]["tanh"]["epochs_per_seed"] == [3.0, 4.0]
    assert s["ratio"]["epochs"] == pytest.approx(3.5 / 2.0)
    assert s["ratio"]["seconds"] == pytest.approx(35 / 20)
    # tanh seed 1 never reaches 25% within 4 epochs: its budget (4) stands in, a lower bound.
    tanh[1] = _run(1, "tanh", [0.6, 0.5, 0.3, 0.3])
    s = F1.summarise(
        cfg, "x", "x", 100, {"relu": 0.1, "tanh": 0.1}, {}, {"relu": relu, "tanh": tanh}
    )
    assert s["ratio"]["epochs"] is None
    assert s["ratio"]["epochs_at_least"] == pytest.approx((3.0 + 4.0) / 2 / 2.0)
    assert "at least 1.75x" in F1.figure1_markdown(s)
    # ReLU short instead: an upper bound.
    s = F1.summarise(
        cfg, "x", "x", 100, {"relu": 0.1, "tanh": 0.1}, {}, {"relu": tanh, "tanh": relu}
    )
    assert s["ratio"]["epochs_at_most"] == pytest.approx(2.0 / 3.5)


@needs_fashion
@pytest.mark.slow
def test_threshold_set_by_the_relu_run_and_short_lr_search(tmp_path):
    """The full mode's rule: the threshold is the chosen ReLU net's (seed 0) own training error
    at epoch E, so ReLU needs E epochs; the lr search runs for --search-epochs only, and the
    seed-0 run of the chosen rate is trained again for the whole budget."""
    cfg = F1.Figure1Config(out=str(tmp_path / "f1"), seeds=1, epochs=2, threshold=None,
                           threshold_epoch=1.0, search_epochs=1, batch_size=64, train_images=512,
                           points_per_epoch=2, lr_grid=(0.01, 0.05), quiet=True)  # fmt: skip
    r = F1.run_figure1(cfg)
    relu = r["curves"]["relu"]
    at_1 = relu["train_error"]["0"][relu["epochs"].index(1.0)]
    assert r["threshold"] == at_1 and "epoch 1" in r["threshold_rule"]
    assert r["to_threshold"]["relu"]["epochs_per_seed"][0] <= 1.0
    names = sorted(p.parent.name for p in (tmp_path / "f1" / "runs").glob("*/result.json"))
    assert sum("-1ep-" in n for n in names) == 4  # 2 rates x 2 nets, 1 epoch each
    assert sum("-2ep-" in n for n in names) == 2  # the chosen rates, seed 0, whole budget
    # The search's epochs to threshold use the threshold the JSON records (not the paper's 25%).
    for act in ("relu", "tanh"):
        for t in r["lr_search"][act]:
            run = json.loads(next((tmp_path / "f1" / "runs").glob(
                f"{act}-lr{t['lr']:g}-seed0-1ep-*/result.json")).read_text())  # fmt: skip
            assert t["epochs_to_threshold"] == crossing(run["epochs"], run["errors"], at_1)
