"""`alexnet neighbors` (Figure 4) and `alexnet report` on a real (tiny) training run: the
neighbours are checked against a brute-force float64 numpy search of the cached features, the
report's sections, numbers and embedded images against the run's own files."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from alexnet.config import get_profile
from alexnet.experiments import neighbors as NB
from alexnet.experiments.report import build_report


@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    """The demo recipe trained for one epoch (3 steps of 12 images) on the tiny store."""
    from alexnet.config import apply_overrides
    from alexnet.train import RunConfig, Trainer

    out = tmp_path_factory.mktemp("exp") / "run"
    profile = apply_overrides(get_profile("demo"), ["train.batch_size=12", "train.epochs=1"])
    run = RunConfig(
        data=str(tiny_store), out=str(out), seed=0, workers=0, val_limit=12, log_every=1
    )
    Trainer(profile, run).fit()
    return out


@pytest.mark.slow  # a 3-step training run of the paper net and fc7 of 39 images (~20 s)
def test_neighbors_are_the_nearest(tiny_run, tiny_store, tmp_path):
    from alexnet.data import open_store

    out = tmp_path / "nb"
    r = NB.run_neighbors(tiny_run, tiny_store, out, index="0,5,11", k=6, top5=True, workers=0)
    data = json.loads((out / "neighbors.json").read_text())
    assert [q["index"] for q in data["queries"]] == [0, 5, 11]
    store = open_store(tiny_store)
    train = np.load(data["feature_cache"]).astype(np.float64)
    queries = np.load(data["query_features"]).astype(np.float64)
    assert train.shape == (store.size("train"), 4096) and queries.shape == (3, 4096)
    assert data["train_images_searched"] == store.size("train")
    for q, qf in zip(data["queries"], queries, strict=True):
        assert q["label"] == int(store.labels("val")[q["index"]])
        # Brute force: every distance, directly, in float64.
        d = np.sqrt(((train - qf) ** 2).sum(axis=1))
        got = [n["train_index"] for n in q["neighbors"]]
        got_d = np.array([n["distance"] for n in q["neighbors"]])
        assert len(got) == 6 == len(set(got))
        assert np.allclose(got_d, np.sort(d)[:6], rtol=1e-9, atol=1e-9)
        assert np.allclose(got_d, d[got], rtol=1e-9, atol=1e-9)
        assert all(a <= b for a, b in zip(got_d, got_d[1:], strict=False))
        for n in q["neighbors"]:
            assert n["label"] == int(store.labels("train")[n["train_index"]])
        # top-5 panel: probabilities sorted, a distribution over the 3 classes
        p = [t["probability"] for t in q["top5"]]
        assert len(p) == 3 and p == sorted(p, reverse=True) and sum(p) == pytest.approx(1, 1e-5)
    # The cached database rows are the same view as the queries (centre crop, mean removed):
    # train image 4 sent through the query path gives row 4 of the cache.
    from alexnet.evaluate import load_model

    loaded = load_model(tiny_run)
    f, _ = NB.query_features(loaded, store, "train", [4])
    assert np.allclose(f[0], train[4], rtol=1e-4, atol=1e-4)
    img = Image.open(out / "neighbors.png")
    assert img.size[0] > img.size[1] > 0
    md = (out / "neighbors.md").read_text()
    assert md.count("\n| ") == 1 + 3  # header row + one row per query
    # Other queries reuse the cached training features.
    mtime = (out / r["feature_cache"].split("/")[-1]).stat().st_mtime_ns
    r2 = NB.run_neighbors(tiny_run, tiny_store, out, images=2, seed=3, workers=0)
    assert r2["feature_cache"] == r["feature_cache"]
    assert (out / r["feature_cache"].split("/")[-1]).stat().st_mtime_ns == mtime
    assert len(r2["queries"]) == 2


def test_nearest_breaks_ties_by_index_and_matches_brute_force():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((300, 16)).astype(np.float32)
    train[10] = train[20] = train[5]  # three identical rows: equal distances
    q = np.stack([train[5] + 1e-3, rng.standard_normal(16)]).astype(np.float32)
    idx, dist = NB.nearest(train, q, 4, chunk=64)
    assert idx[0, :3].tolist() == [5, 10, 20]
    for r in range(2):
        d = np.linalg.norm(train.astype(np.float64) - q[r].astype(np.float64), axis=1)
        order = np.lexsort((np.arange(len(d)), d))[:4]
        assert idx[r].tolist() == order.tolist()
        assert np.allclose(dist[r], d[order], rtol=1e-12)


def _embedded_pngs(page: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        out.append(Image.open(io.BytesIO(base64.b64decode(b64))))
    return out


@pytest.mark.slow  # kernels + neighbours of the tiny run (~10 s after the fixture)
def test_report_sections_numbers_and_images(tiny_run, tiny_store, tmp_path):
    page = build_report(
        tiny_run, tmp_path / "r.html", data=str(tiny_store), neighbors_images=2, train_limit=None
    )
    text = page.read_text()
    for section in ("run", "errors", "curves", "kernels", "neighbors", "deviations", "config"):
        assert f'<h2 id="{section}">' in text
    # Self-contained: no image or stylesheet fetched from anywhere.
    assert not re.search(r'src="(?!data:)', text) and "<link" not in text
    imgs = _embedded_pngs(text)
    assert len(imgs) == 3  # curves, kernels, neighbours
    curves = Image.open(tiny_run / "curves.png")
    assert imgs[0].size == curves.size
    # Final errors: the last epoch record of metrics.jsonl, as percentages.
    epochs = [
        json.loads(x)
        for x in (tiny_run / "metrics.jsonl").read_text().splitlines()
        if '"kind": "epoch"' in x
    ]
    last = epochs[-1]
    assert f"{100 * last['val_top1_error']:.2f}%" in text
    assert f"{100 * last['val_top5_error']:.2f}%" in text
    # The profile against the paper's: the batch size and epochs differ (12 vs 128, 1 vs 90).
    dev = text[text.index('id="deviations"') : text.index('id="config"')]
    assert "<td>train.batch_size</td><td>12</td><td>128</td>" in dev
    assert "<td>train.epochs</td><td>1</td><td>90</td>" in dev
    # The kernel numbers are those `alexnet kernels` computes for the run.
    k = json.loads((tmp_path / "r_files" / "kernels" / "kernels.json").read_text())
    assert f"{k['towers']['A']['chroma_share_mean']:.3f}" in text
    # Not a run folder: one clear error line from the command, exit status 2.
    from alexnet.commands import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    # Without a store, the neighbours section says why.
    page2 = build_report(tiny_run, tmp_path / "r2.html", data=str(tmp_path / "nowhere"))
    t2 = page2.read_text()
    assert "Skipped" in t2 and len(_embedded_pngs(t2)) == 2
