"""The views: ten_crop's exact positions and reflections, PCA lighting's per-image offset and its
covariance, the lighting bases of the two profiles, and `preprocess` for prediction."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import DataConfig
from alexnet.data import lighting_basis, pca_lighting, preprocess, ten_crop
from alexnet.data.views import hash_normal, hash_uniform


def test_ten_crop_positions_and_reflections():
    a = np.random.default_rng(0).standard_normal((3, 256, 256)).astype(np.float32)
    got = ten_crop(torch.from_numpy(a), 224).numpy()
    assert got.shape == (10, 3, 224, 224)
    five = [
        a[:, 0:224, 0:224],  # top-left
        a[:, 0:224, 32:256],  # top-right
        a[:, 32:256, 0:224],  # bottom-left
        a[:, 32:256, 32:256],  # bottom-right
        a[:, 16:240, 16:240],  # centre
    ]
    for k in range(5):
        np.testing.assert_array_equal(got[k], five[k])
        np.testing.assert_array_equal(got[5 + k], five[k][:, :, ::-1])  # the same, reflected
    # Caffe's 227 crop: a margin of 29, the centre at floor(29 / 2) = 14
    b = np.arange(3 * 256 * 256, dtype=np.float32).reshape(3, 256, 256)
    got = ten_crop(torch.from_numpy(b), 227).numpy()
    np.testing.assert_array_equal(got[1], b[:, 0:227, 29:256])
    np.testing.assert_array_equal(got[4], b[:, 14:241, 14:241])
    np.testing.assert_array_equal(got[8], b[:, 29:256, 29:256][:, :, ::-1])
    with pytest.raises(ValueError):
        ten_crop(torch.zeros(3, 100, 100), 224)


def random_eig(seed: int = 0):
    """A covariance-like 3x3 eigen-decomposition (eigenvectors as columns), float64."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((3, 3))
    w, v = np.linalg.eigh(m @ m.T + 0.5 * np.eye(3))
    return w[::-1].copy(), v[:, ::-1].copy()


def test_pca_lighting_one_offset_per_image():
    w, v = random_eig(1)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 255
    g = torch.Generator().manual_seed(0)
    y = pca_lighting(x, w, v, std=0.1, generator=g)
    d = (y - x).numpy()
    # one RGB offset per image: the same at every pixel...
    np.testing.assert_allclose(d, np.broadcast_to(d[:, :, :1, :1], d.shape), atol=1e-12)
    off = d[:, :, 0, 0]
    # ...different for each image, and in the span eigvec @ (alpha * eigval)
    assert len({tuple(np.round(o, 9)) for o in off}) == 4
    alpha = np.linalg.solve(v, off.T).T / w  # alpha_i = (p_i . offset) / l_i
    assert np.all(np.abs(alpha) < 0.6)  # N(0, 0.1) draws: 6 sigma
    # a single image (3, H, W) works too, and each call draws afresh
    one = torch.zeros(3, 5, 5, dtype=torch.float64)
    a, b = pca_lighting(one, w, v, generator=g), pca_lighting(one, w, v, generator=g)
    assert a.shape == (3, 5, 5) and not torch.allclose(a, b)
    assert torch.equal(x, x.clone())  # input untouched


def test_pca_lighting_covariance_over_many_draws():
    """Sec. 4.1: offset = [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T with a_i ~ N(0, 0.1), so
    Cov(offset) = V diag((0.1 l)^2) V^T."""
    w, v = random_eig(2)
    n = 40000
    x = torch.zeros(n, 3, 1, 1, dtype=torch.float64)
    off = pca_lighting(x, w, v, std=0.1, generator=torch.Generator().manual_seed(3))
    off = off[:, :, 0, 0].numpy()
    expected = v @ np.diag((0.1 * w) ** 2) @ v.T
    emp = np.cov(off.T)
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.abs(emp - expected).max() / scale.max() < 0.03
    assert np.all(np.abs(off.mean(axis=0)) < 4 * np.sqrt(np.diag(expected) / n))


def test_lighting_bases_of_the_profiles():
    w, v = random_eig(4)
    stats = SimpleNamespace(eigval=w * 1000, eigvec=v)
    lam, vec = lighting_basis(stats, "paper")
    # the paper's formula on [0, 1] intensities, rescaled to 0-255: 255 * (l / 255^2)
    np.testing.assert_allclose(lam, w * 1000 / 255.0)
    lam, vec = lighting_basis(stats, "cuda-convnet")
    np.testing.assert_allclose(lam, np.sqrt(w * 1000))  # convdata.py: standard deviations
    np.testing.assert_array_equal(vec, v)


def test_hash_random_numbers_are_uniform_and_normal():
    idx = np.arange(200000)
    u = hash_uniform(7, 3, 1, idx, 2)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.001
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.01
    # a pure function of its arguments; any argument changes the numbers
    np.testing.assert_array_equal(u[:10], hash_uniform(7, 3, 1, idx[:10], 2))
    for args in ((8, 3, 1), (7, 4, 1), (7, 3, 2)):
        assert not np.allclose(u[:10], hash_uniform(*args, idx[:10], 2))
    z = hash_normal(7, 3, 3, idx, 3)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.05  # Gaussian kurtosis


def test_preprocess_matches_a_direct_computation(tmp_path):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    mean_image = rng.uniform(0, 255, (256, 256, 3))
    stats = SimpleNamespace(
        mean_image=mean_image,
        channel_mean=np.array([120.0, 110.0, 100.0]),
        channel_std=np.array([60.0, 55.0, 50.0]),
        eigval=np.ones(3),
        eigvec=np.eye(3),
    )
    x = img.astype(np.float64)
    diff = (x - mean_image).transpose(2, 0, 1)  # Sec. 2: minus the mean image
    got = preprocess(path, DataConfig(), stats).numpy()
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, diff[:, 16:240, 16:240], atol=1e-3)
    got10 = preprocess(Image.open(path), DataConfig(), stats, views=10).numpy()
    assert got10.shape == (10, 3, 224, 224)
    np.testing.assert_allclose(got10[1], diff[:, 0:224, 32:256], atol=1e-3)  # top-right
    np.testing.assert_allclose(got10[7], diff[:, 32:256, 0:224][:, :, ::-1], atol=1e-3)
    # cuda-convnet: the centre of the mean image for every view
    got_c = preprocess(path, DataConfig(mean="center"), stats, views=10).numpy()
    centre = mean_image[16:240, 16:240].transpose(2, 0, 1)
    np.testing.assert_allclose(got_c[2], x[32:256, 0:224].transpose(2, 0, 1) - centre, atol=1e-3)
    # torchvision-style normalisation: (x/255 - m/255) / (s/255)
    got_t = preprocess(path, DataConfig(mean="channel-std"), stats).numpy()
    m, s = stats.channel_mean[:, None, None], stats.channel_std[:, None, None]
    np.testing.assert_allclose(got_t, (x[16:240, 16:240].transpose(2, 0, 1) - m) / s, atol=1e-5)


def test_preprocess_errors(tmp_path):
    stats = SimpleNamespace(
        mean_image=np.zeros((256, 256, 3)),
        channel_mean=np.zeros(3),
        channel_std=np.ones(3),
        eigval=np.ones(3),
        eigvec=np.eye(3),
    )
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a JPEG")
    with pytest.raises(ValueError) as e:
        preprocess(bad, DataConfig(), stats)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)  # names the file
    with pytest.raises(FileNotFoundError):
        preprocess(tmp_path / "missing.jpg", DataConfig(), stats)
    # a 16-bit grey PNG of another size: converted, rescaled, cropped like the store's images
    Image.fromarray(np.full((300, 400), 65535, np.uint16)).save(tmp_path / "g.png")
    out = preprocess(tmp_path / "g.png", DataConfig(), stats)
    np.testing.assert_allclose(out.numpy(), 255.0)


@pytest.mark.slow
def test_bench_data_reports_both_sides(capsys, tmp_path):
    """`alexnet bench data --json` at its smallest: one JSON object with both rates, and its
    section written into a BENCHMARKS.md beside another benchmark's, which it leaves alone."""
    import argparse
    import json

    from alexnet.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_data_arguments(parser)
    md = tmp_path / "BENCHMARKS.md"
    other = "<!-- alexnet bench model: begin -->\nmodel table\n<!-- alexnet bench model: end -->"
    md.write_text(f"# Benchmarks\n\n{other}\n")
    args = parser.parse_args(["--json", "--images", "512", "--workers", "1", "--seconds", "0",
                              "--markdown", str(md)])  # fmt: skip
    threads = torch.get_num_threads()
    assert bench.run_bench_data(args) == 0
    assert torch.get_num_threads() == threads
    r = json.loads(capsys.readouterr().out)
    assert r["workers"] == 1 and r["images"] == 512 and r["encoding"] == "jpeg"
    assert r["loader_images_per_s"] > 0 and r["baseline_images_per_s"] > 0
    assert abs(r["ratio"] - r["loader_images_per_s"] / r["baseline_images_per_s"]) < 0.02
    assert 2000 < r["store_bytes_per_image"] < r["source_jpeg_bytes_per_image"]
    assert r["machine"]["cores"] >= 1 and "--images 512" in r["command"]
    text = md.read_text()
    assert other in text and text.count("alexnet bench data, 1 workers: begin") == 1
    assert f"| {r['loader_images_per_s']:.0f} |" in text and f"{r['ratio']:.2f}x" in text
    # Run again: the section is replaced, not repeated.
    assert bench.run_bench_data(args) == 0
    assert md.read_text().count("alexnet bench data, 1 workers: begin") == 1
