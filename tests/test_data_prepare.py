"""`alexnet prepare`: every kind of source, odd and broken files, resume after a kill, clear
errors, and the statistics against a separate numpy computation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.data import open_store, prepare_store
from alexnet.data.sources import read_idx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def cli_main(argv: list[str]) -> int:
    """`alexnet prepare ...` through its own argument parser (the subcommand as registered)."""
    import argparse

    from alexnet.commands import prepare as prepare_command

    parser = argparse.ArgumentParser(prog="alexnet")
    prepare_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def save(arr: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def photo_tree(root: Path, per_class: int = 3, size=(60, 45)) -> Path:
    """root/<class>/<i>.jpg cut from real photos (small, to stay fast)."""
    rng = np.random.default_rng(1)
    for c, name in enumerate(("astronaut", "coffee", "chelsea")):
        img = Image.fromarray(photo(name))
        for i in range(per_class):
            x, y = int(rng.integers(0, 100)), int(rng.integers(0, 100))
            crop = img.crop((x, y, x + 200, y + 150)).resize(size)
            save(np.asarray(crop), root / f"c{c}" / f"{i}.jpg", quality=95)
    return root


def quiet(**kw):
    return dict(progress=False, log=lambda *a: None, workers=1) | kw


# --- statistics --------------------------------------------------------------------------------


def numpy_stats(images: list[np.ndarray]):
    """The statistics computed directly, in float64, from (S, S, 3) uint8 images."""
    x = np.stack(images).astype(np.float64)  # (N, S, S, 3)
    px = x.reshape(-1, 3)
    mu = px.mean(axis=0)
    cov = (px - mu).T @ (px - mu) / len(px)
    w, v = np.linalg.eigh(cov)
    return x.mean(axis=0), mu, px.std(axis=0), cov, w[::-1], v[:, ::-1]


def test_folder_stats_and_views_against_numpy(tmp_path):
    src = photo_tree(tmp_path / "src")
    store = prepare_store(src, tmp_path / "out", size=32, val_fraction=0.34, **quiet())
    assert store.manifest["kind"] == "folder" and store.classes == ["c0", "c1", "c2"]
    # --val-fraction: round(3 * 0.34) = 1 image of each class held out
    assert store.size("train") == 6 and store.size("val") == 3
    assert sorted(store.labels("val").tolist()) == [0, 1, 2]
    images = [store.image("train", i) for i in range(store.size("train"))]
    mean_image, mu, std, cov, w, v = numpy_stats(images)
    st = store.stats
    assert st.mean_image.dtype == np.float64 and st.mean_image.shape == (32, 32, 3)
    np.testing.assert_allclose(st.mean_image, mean_image, rtol=0, atol=1e-9)
    np.testing.assert_allclose(st.channel_mean, mu, atol=1e-9)
    np.testing.assert_allclose(st.channel_std, std, atol=1e-9)
    np.testing.assert_allclose(st.cov, cov, atol=1e-7)
    np.testing.assert_allclose(st.eigval, w, rtol=1e-9, atol=1e-7)
    assert np.all(np.diff(st.eigval) <= 0)  # descending
    for k in range(3):  # columns are the eigenvectors (up to sign)
        assert abs(abs(st.eigvec[:, k] @ v[:, k]) - 1) < 1e-8
        np.testing.assert_allclose(cov @ st.eigvec[:, k], w[k] * st.eigvec[:, k], atol=1e-6)
    assert store.manifest["stats"]["images"] == 6


def test_a_class_without_val_images_is_named(tmp_path):
    """Issue 21's note: 5 photos per class at the default 10% held out none (0.5 rounds to 0),
    and prepare said nothing. Now a warning names the classes and a fraction that holds one."""
    src = photo_tree(tmp_path / "src")  # 3 images per class: 10% of 3 rounds to 0
    lines: list[str] = []
    store = prepare_store(src, tmp_path / "out", size=32, **quiet(log=lines.append))
    assert store.size("val") == 0
    (warning,) = [x for x in lines if x.startswith("warning:")]
    assert "3 of 3 classes (c0, c1, c2)" in warning and "--val-fraction 0.34" in warning
    lines.clear()  # the fraction it names holds out round(3 * 0.34) = 1 of each class
    store = prepare_store(
        src, tmp_path / "out2", size=32, val_fraction=0.34, **quiet(log=lines.append)
    )
    assert store.size("val") == 3 and not [x for x in lines if x.startswith("warning:")]


def test_rescale_is_shorter_side_then_centre(tmp_path):
    """A linear ramp survives bilinear resampling, so where each output pixel came from in the
    source is readable from its value: Sec. 2's rescale + central crop, checked by geometry."""
    w, h = 400, 200
    ramp = np.zeros((h, w, 3), np.uint8)
    ramp[..., 0] = (np.arange(w)[None, :] // 2).astype(np.uint8)  # R = column / 2
    ramp[..., 1] = np.arange(h)[:, None].astype(np.uint8)  # G = row
    save(ramp, tmp_path / "src" / "a" / "ramp.png")
    save(ramp, tmp_path / "src" / "a" / "ramp2.png")
    store = prepare_store(
        tmp_path / "src", tmp_path / "out", size=100, encoding="raw", val_fraction=0.5, **quiet()
    )
    out = store.image("train", 0).astype(np.float64)
    # Shorter side 200 -> 100 (factor 2); the central 100 columns of the 200-wide result are
    # source columns 100..300: output column j sits at source x = 100 + 2j + 0.5.
    j = np.arange(3, 97)
    np.testing.assert_allclose(out[50, j, 0], (100 + 2 * j + 0.5) / 2, atol=0.76)
    np.testing.assert_allclose(out[j, 50, 1], 2 * j + 0.5, atol=0.76)
    # Already the right size on the shorter side: an exact central crop, no resampling.
    img = np.random.default_rng(0).integers(0, 256, (64, 90, 3), dtype=np.uint8)
    save(img, tmp_path / "src2" / "a" / "x.png")
    save(img, tmp_path / "src2" / "a" / "y.png")
    s2 = prepare_store(
        tmp_path / "src2", tmp_path / "out2", size=64, encoding="raw", val_fraction=0.5, **quiet()
    )
    np.testing.assert_array_equal(s2.image("train", 0), img[:, 13:77])


# --- odd and broken files ----------------------------------------------------------------------


def test_odd_modes_exif_and_broken_files(tmp_path):
    src = tmp_path / "src"
    a = src / "a"
    # EXIF orientation 6: the camera stored the picture rotated; shown, it is turned 90 degrees
    # clockwise. Stored: left half red, right half blue -> shown: top red, bottom blue.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(stored, a / "exif.jpg", quality=98, exif=exif)
    gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))  # (40, 40) grey ramp
    save(gray, a / "gray.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[..., 3] = np.arange(40, dtype=np.uint8)[None, :] * 6  # alpha varies: dropped
    save(rgba, a / "rgba.png")
    cmyk = Image.new("CMYK", (40, 40), (255, 0, 0, 0))  # pure cyan ink
    cmyk.save(a / "cmyk.jpg", quality=98)
    sixteen = np.full((40, 40), 65535, np.uint16)
    sixteen[:, 20:] = 257 * 100
    Image.fromarray(sixteen).save(a / "sixteen.png")  # mode I;16
    pal = Image.fromarray(np.full((40, 40, 3), (200, 100, 50), np.uint8))
    pal = pal.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(a / "palette.gif")
    # broken ones
    full = (a / "gray.png").read_bytes()
    save(photo("coffee")[:100, :100], a / "whole.jpg", quality=90)
    jpeg = (a / "whole.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (a / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (a / "notes.txt").write_text("not an image")
    (a / "empty.png").write_bytes(b"")
    (a / "cut.png").write_bytes(full[:60])
    (a / ".hidden.jpg").write_bytes(b"ignored")  # hidden files are not listed at all
    (src / "b").mkdir()
    save(np.zeros((40, 40, 3), np.uint8), src / "b" / "black.png")

    store = prepare_store(
        src, tmp_path / "out", size=40, encoding="raw", val_fraction=0.01, **quiet()
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = report["skipped"]["train"] + report["skipped"]["val"]
    names = sorted(s.split(":")[0].split("/")[-1] for s in skipped)
    assert names == ["cut.png", "empty.png", "noise.jpg", "notes.txt", "truncated.jpg"]
    assert sum(store.manifest["skipped"].values()) == 5
    assert store.size("train") + store.size("val") == 8
    got = {}
    files = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    readable = [f for f in files if f not in names]  # listing order is sorted by name
    for i, name in enumerate(readable):
        got[name] = store.image("train", i).astype(int)
    e = got["exif.jpg"]
    assert e.shape == (40, 40, 3)
    assert np.abs(e[:15].mean(axis=(0, 1)) - (255, 0, 0)).max() < 20  # top red
    assert np.abs(e[25:].mean(axis=(0, 1)) - (0, 0, 255)).max() < 20  # bottom blue
    g = got["gray.png"]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    np.testing.assert_array_equal(g[..., 0], gray)
    np.testing.assert_array_equal(got["rgba.png"], np.broadcast_to((10, 200, 30), (40, 40, 3)))
    assert np.abs(got["cmyk.jpg"].mean(axis=(0, 1)) - (0, 255, 255)).max() < 8
    s = got["sixteen.png"]  # 16-bit scaled to 8 bits (65535 -> 255, 25700 -> 100), not clipped
    assert (s[:, :20] == 255).all() and (s[:, 20:] == 100).all()
    np.testing.assert_array_equal(got["palette.gif"], np.broadcast_to((200, 100, 50), (40, 40, 3)))


# --- every kind of source ----------------------------------------------------------------------


def write_meta_mat(path: Path, synsets: list[tuple[int, str, str]]) -> None:
    """A devkit-style meta.mat: a struct array `synsets` with the devkit's fields."""
    from scipy.io import savemat

    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, words, 0) for i, w, words in synsets]
    rows.append((len(rows) + 1, "n99999999", "an inner node", 3))  # not a leaf: ignored
    savemat(path, {"synsets": np.array(rows, dtype=dt)})


def imagenet_like(root: Path, train_as_tar: bool = False) -> dict:
    """train/<wnid>/*.JPEG (or the official tar of per-class tars), a flat val/ folder and the
    devkit's ground truth. The devkit's IDs deliberately differ from the sorted-WNID order."""
    wnids = ["n01440764", "n02102040", "n03000684"]
    words = ["tench", "English springer", "chain saw"]
    ids = {"n03000684": 1, "n01440764": 2, "n02102040": 3}  # ILSVRC2012_ID per class
    rng = np.random.default_rng(2)
    pics = [photo(n) for n in ("astronaut", "coffee", "chelsea")]
    for k, w in enumerate(wnids):
        for i in range(2):
            arr = np.asarray(Image.fromarray(pics[k]).resize((50 + 10 * i, 40)))
            save(arr, root / "train" / w / f"{w}_{i}.JPEG", quality=92)
    val_classes = [2, 0, 1, 1, 0, 2]  # class index (sorted WNID) of val image 1..6
    for n, k in enumerate(val_classes, start=1):
        arr = (pics[k][::4, ::4] + rng.integers(0, 5, (1,), dtype=np.uint8)).astype(np.uint8)
        save(arr, root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", quality=92)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[wnids[k]]}\n" for k in val_classes)
    )
    write_meta_mat(data / "meta.mat", sorted((ids[w], w, words[k]) for k, w in enumerate(wnids)))
    if train_as_tar:
        for w in wnids:
            with tarfile.open(root / f"{w}.tar", "w") as t:
                for f in sorted((root / "train" / w).iterdir()):
                    t.add(f, arcname=f.name)
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as t:
            for w in wnids:
                t.add(root / f"{w}.tar", arcname=f"{w}.tar")
                (root / f"{w}.tar").unlink()
        import shutil

        shutil.rmtree(root / "train")
    return {"wnids": wnids, "words": words, "val_classes": val_classes}


def test_imagenet_layouts(tmp_path, capsys):
    info = imagenet_like(tmp_path / "inet")
    rc = cli_main(
        [
            "prepare",
            str(tmp_path / "inet"),
            str(tmp_path / "s1"),
            "--size",
            "32",
            "--workers",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    assert "detected: ImageNet" in capsys.readouterr().out
    s1 = open_store(tmp_path / "s1")
    assert s1.classes == info["wnids"]
    assert s1.manifest["class_names"] == info["words"]
    assert s1.labels("val").tolist() == info["val_classes"]
    assert s1.labels("train").tolist() == [0, 0, 1, 1, 2, 2]

    # The same images as the official train tar of per-class tars: the same store content.
    info2 = imagenet_like(tmp_path / "inet2", train_as_tar=True)
    s2 = prepare_store(tmp_path / "inet2", tmp_path / "s2", kind="imagenet", size=32, **quiet())
    assert s2.classes == info2["wnids"] and s2.labels("train").tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(6):
        np.testing.assert_array_equal(s1.image("train", i), s2.image("train", i))
    assert "ILSVRC2012_img_train.tar" in s2.manifest["source"]["description"]

    # A val folder already split into class folders.
    root3 = tmp_path / "inet3"
    imagenet_like(root3)
    for n, k in enumerate(info["val_classes"], start=1):
        f = root3 / "val" / f"ILSVRC2012_val_{n:08d}.JPEG"
        (root3 / "val" / info["wnids"][k]).mkdir(exist_ok=True)
        f.rename(root3 / "val" / info["wnids"][k] / f.name)
    s3 = prepare_store(root3, tmp_path / "s3", size=32, **quiet())
    assert sorted(s3.labels("val").tolist()) == sorted(info["val_classes"])

    # Flat val images without the devkit cannot be labelled: a clear error, nothing written.
    root4 = tmp_path / "inet4"
    imagenet_like(root4)
    (root4 / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(ValueError, match="devkit"):
        prepare_store(root4, tmp_path / "s4", size=32, **quiet())
    assert not (tmp_path / "s4").exists()


def write_cifar(root: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches in the official format (pickled dicts of bytes keys)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    all_imgs, all_labels = [], []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        # rows: 1024 red values, 1024 green, 1024 blue, each row-major 32x32
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        d = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with open(root / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        all_imgs.append(imgs)
        all_labels.append(labels)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(all_imgs), np.concatenate(all_labels)


def test_cifar10(tmp_path, capsys):
    imgs, labels = write_cifar(tmp_path / "cifar-10-batches-py")
    store = prepare_store(
        tmp_path, tmp_path / "out", size=32, encoding="raw", progress=False, workers=1
    )
    assert "detected: CIFAR-10" in capsys.readouterr().out
    assert store.classes[:2] == ["airplane", "automobile"]
    assert store.size("train") == 15 and store.size("val") == 3
    for i in range(15):  # --size 32: the pictures unchanged, channels in the right order
        np.testing.assert_array_equal(store.image("train", i), imgs[i])
    np.testing.assert_array_equal(store.labels("train"), labels[:15])
    np.testing.assert_array_equal(store.image("val", 2), imgs[17])


def bilinear_upscale(a: np.ndarray, size: int) -> np.ndarray:
    n = a.shape[0]
    c = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    f = c - i0
    rows = a[i0] * (1 - f)[:, None] + a[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_real_files(tmp_path, capsys):
    """The default dataset: one path means OUT, SRC defaults to the Debian files."""
    rc = cli_main(["prepare", str(tmp_path / "fm"), "--limit", "40", "--workers", "2", "-q"])
    assert rc == 0
    assert "Fashion-MNIST" in capsys.readouterr().out
    store = open_store(tmp_path / "fm")
    m = store.manifest
    assert m["kind"] == "fashion-mnist" and m["channels"] == 1 and m["image_size"] == 256
    assert store.classes[0] == "T-shirt/top" and store.splits == ["train", "val"]
    assert store.size("train") == 40 and store.size("val") == 40
    raw = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    lab = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(store.labels("val"), lab[:40])
    for i in (0, 17):
        img = store.image("val", i)
        assert img.shape == (256, 256, 3) and (img[..., 0] == img[..., 2]).all()
        # 28 -> 256 bilinear: each output pixel centre, mapped into the source, interpolated
        # between its four neighbours (edges clamped); the store holds it up to JPEG noise.
        expect = bilinear_upscale(raw[i].astype(np.float64), 256)
        err = np.abs(img[..., 0] - expect)
        assert err.mean() < 1.0 and np.percentile(err, 99) < 6
    st = store.stats  # grey: R = G = B, so one non-zero eigenvalue along (1, 1, 1)/sqrt(3)
    assert st.eigval[1] < 1e-6 * st.eigval[0]
    np.testing.assert_allclose(np.abs(st.eigvec[:, 0]), np.full(3, 3**-0.5), atol=1e-9)
    assert m["source"]["files_sha256"]["t10k-images-idx3-ubyte.gz"]


# --- errors: clear, early, and harmless -----------------------------------------------------------


def test_errors_lose_nothing(tmp_path):
    src = photo_tree(tmp_path / "src", per_class=2)
    (src / "c3").mkdir()
    with pytest.raises(ValueError, match="class folder .*c3 is empty"):
        prepare_store(src, tmp_path / "out", size=16, **quiet())
    assert not (tmp_path / "out").exists()
    (src / "c3").rmdir()
    with pytest.raises(ValueError, match="CIFAR-10"):
        prepare_store(src, tmp_path / "out", kind="cifar10", size=16, **quiet())
    with pytest.raises(ValueError, match="does not look like ImageNet"):
        prepare_store(src, tmp_path / "out", kind="imagenet", size=16, **quiet())
    with pytest.raises(ValueError, match="Fashion-MNIST"):
        prepare_store(src, tmp_path / "out", kind="fashion-mnist", size=16, **quiet())
    with pytest.raises(ValueError, match="cannot tell"):
        prepare_store(tmp_path / "src" / "c0", tmp_path / "out", size=16, **quiet())
    with pytest.raises(FileNotFoundError):
        prepare_store(tmp_path / "nothing", tmp_path / "out", size=16, **quiet())
    with pytest.raises(ValueError, match="inside SRC"):
        prepare_store(src, src / "store", size=16, **quiet())
    assert not (src / "store").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        prepare_store(src, other, size=16, **quiet())
    assert (other / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in other.iterdir()) == ["precious.txt"]

    done = prepare_store(src, tmp_path / "out", size=16, val_fraction=0.5, **quiet())
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    again = prepare_store(src, tmp_path / "out", size=16, val_fraction=0.5, **quiet())
    assert again.manifest == done.manifest  # the same command again: nothing to do
    with pytest.raises(ValueError, match="already holds a prepared store"):
        prepare_store(src, tmp_path / "out", size=24, val_fraction=0.5, **quiet())
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest
    assert open_store(tmp_path / "out").size("train") == 3

    # A store made before a parameter existed (no "classes" key) is the same store when the
    # parameter has its default; `make demo` refused such a Fashion-MNIST store after --classes.
    m = json.loads(manifest)
    del m["params"]["classes"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(m))
    prepare_store(src, tmp_path / "out", size=16, val_fraction=0.5, **quiet())
    with pytest.raises(ValueError, match="already holds a prepared store"):
        prepare_store(
            src, tmp_path / "out", size=16, val_fraction=0.5, classes=["c0", "c1"], **quiet()
        )


def test_open_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a store"):
        open_store(tmp_path / "plain")
    (tmp_path / "half" / ".prepare").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete"):
        open_store(tmp_path / "half")
    src = photo_tree(tmp_path / "src", per_class=1)
    prepare_store(src, tmp_path / "s", size=16, val_fraction=0.5, **quiet())
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="version 99"):
        open_store(tmp_path / "s")


# --- resume ------------------------------------------------------------------------------------


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.glob("*/shard-*.bin"))
    }


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.manifest["counts"] == sb.manifest["counts"]
    assert sa.manifest["source"]["content_sha256"] == sb.manifest["source"]["content_sha256"]
    for split in sa.splits:
        np.testing.assert_array_equal(sa.index(split), sb.index(split))
        np.testing.assert_array_equal(sa.labels(split), sb.labels(split))
        for i in range(sa.size(split)):
            assert sa.record(split, i) == sb.record(split, i)
    np.testing.assert_array_equal(sa.stats.mean_image, sb.stats.mean_image)
    np.testing.assert_array_equal(sa.stats.cov, sb.stats.cov)


def test_resume_after_interrupt(tmp_path, monkeypatch):
    """Ctrl-C half-way (KeyboardInterrupt from the 7th image): the store is incomplete, the
    same command resumes, the chunks already made are kept, the result equals a clean run."""
    import alexnet.data.prepare as prep

    src = photo_tree(tmp_path / "src", per_class=4)
    kw = dict(size=24, val_fraction=0.25, chunk_size=2, **quiet())
    real = prep.encode_item
    calls = {"n": 0}

    def flaky(data, params):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(data, params)

    monkeypatch.setattr(prep, "encode_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_store(src, tmp_path / "out", **kw)
    monkeypatch.setattr(prep, "encode_item", real)
    with pytest.raises(ValueError, match="incomplete"):
        open_store(tmp_path / "out")
    before = shard_files(tmp_path / "out")
    assert len(before) == 3  # chunks of 2 images: 3 done, the 4th interrupted
    logs = []
    prep.prepare_store(src, tmp_path / "out", **dict(kw, log=logs.append))
    assert any("resuming: 3 of" in line for line in logs)
    after = shard_files(tmp_path / "out")
    assert all(after[k] == v for k, v in before.items())  # not rewritten
    assert not (tmp_path / "out" / ".prepare").exists()
    prep.prepare_store(src, tmp_path / "clean", **kw)
    assert_same_store(tmp_path / "out", tmp_path / "clean")

    # An interrupted prepare of something else in OUT: a clear error, its work kept.
    (tmp_path / "out2" / ".prepare").mkdir(parents=True)
    (tmp_path / "out2" / ".prepare" / "state.json").write_text(json.dumps({"kind": "imagenet"}))
    with pytest.raises(ValueError, match="interrupted prepare of something else"):
        prep.prepare_store(src, tmp_path / "out2", **kw)
    assert (tmp_path / "out2" / ".prepare" / "state.json").exists()


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real kill -9 of the prepare process in the middle of its work (the process kills
    itself from inside the 5th image, so the moment is exact), then the same command."""
    src = photo_tree(tmp_path / "src", per_class=3)
    out = tmp_path / "out"
    script = f"""
import os, signal
import alexnet.data.prepare as prep
real, n = prep.encode_item, [0]
def dying(data, params):
    n[0] += 1
    if n[0] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(data, params)
prep.encode_item = dying
prep.prepare_store({str(src)!r}, {str(out)!r}, size=24, val_fraction=0.34, chunk_size=2,
                   workers=1, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    with pytest.raises(ValueError, match="incomplete"):
        open_store(out)
    assert len(shard_files(out)) == 2
    rc = cli_main(
        [
            "prepare",
            str(src),
            str(out),
            "--size",
            "24",
            "--val-fraction",
            "0.34",
            "--chunk-size",
            "2",
            "--workers",
            "2",
            "-q",
        ]
    )
    assert rc == 0
    prepare_store(src, tmp_path / "clean", size=24, val_fraction=0.34, chunk_size=2, **quiet())
    assert_same_store(out, tmp_path / "clean")
    assert os.listdir(out / "train")  # shards are there
