"""`alexnet neighbors` (Figure 4) and `alexnet report` on a real (tiny) training run: the
neighbours are checked against a brute-force float64 numpy search of the cached features, the
report's sections, numbers and embedded images against the run's own files."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.config import get_profile
from alexnet.experiments import neighbors as NB
from alexnet.experiments.common import (
    Metric,
    Row,
    Study,
    plot_study,
    run_study,
    study_table,
    summarise_study,
    write_study,
)
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
        tiny_run, tmp_path / "r", data=str(tiny_store), neighbors_images=2, train_limit=None
    )
    assert page == tmp_path / "r" / "report.html"  # --out is a folder, as in every command
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
    # Issue 20: 3 classes, so no top-5 column (always 0); each score beside its reference:
    # chance (1 - 1/3 top-1, ln 3 loss), conv1's untrained colour share (2/3), and the share
    # of same-class neighbours a random pick among the 36 training images gives (12 per class).
    errors = text[text.index('id="errors"') : text.index('id="curves"')]
    assert "top-5" not in errors.split("</table>")[0] and "66.67%" in errors and "1.0986" in errors
    kern = text[text.index('id="kernels"') : text.index('id="neighbors"')]
    assert "<th>untrained</th>" in kern and kern.count("<td>0.667</td>") == 2
    assert "picked at random among those images: 33%" in text
    # Provenance: trained from scratch with the demo recipe; the config behind a fold.
    assert "scratch" in text and "<td>recipe</td><td>demo: " in text
    assert "<details>" in text[text.index('id="config"') :]
    # The profile against the paper's: the batch size and epochs differ (12 vs 128, 1 vs 90).
    dev = text[text.index('id="deviations"') : text.index('id="config"')]
    assert "<td>train.batch_size</td><td>12</td><td>128</td>" in dev
    assert "<td>train.epochs</td><td>1</td><td>90</td>" in dev
    assert dev.count("train.batch_size") == 1  # one list, not the table and the recorded list
    # The kernel numbers are those `alexnet kernels` computes for the run.
    k = json.loads((tmp_path / "r" / "report_files" / "kernels" / "kernels.json").read_text())
    assert f"{k['towers']['A']['chroma_share_mean']:.3f}" in text
    # Not a run folder: one clear error line from the command, exit status 2.
    from alexnet.commands import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    # Issue 21: a page name where the folder goes is refused, naming what --out is.
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "page.html")]) == 2
    assert not (tmp_path / "page.html").exists()
    # Without a store, the neighbours section says why. A fine-tuned run says from what: here
    # the tiny run's weights loaded into a 2-class net (config.json's derived.init, as
    # `train --init` records it).
    import shutil

    from alexnet import checkpoint
    from alexnet.model import build_model

    ft = tmp_path / "ft"
    shutil.copytree(tiny_run, ft, ignore=shutil.ignore_patterns("*.tfevents.*", "state.pt"))
    cfg = json.loads((ft / "config.json").read_text())
    torch.manual_seed(0)
    two = build_model(get_profile("demo"), num_classes=2)
    cfg["derived"]["init"] = checkpoint.init_from(two, tiny_run / "model.safetensors", ["x", "y"])
    (ft / "config.json").write_text(json.dumps(cfg))
    t2 = build_report(ft, tmp_path / "r2", data=str(tmp_path / "nowhere")).read_text()
    assert "Skipped" in t2 and len(_embedded_pngs(t2)) == 2
    run = t2[t2.index('id="run"') : t2.index('id="errors"')]
    assert f"fine-tuned from {tiny_run / 'model.safetensors'}" in run
    n = len(two.state_dict())
    assert f"{n - 2} of {n} tensors" in run and "fc8.weight: the classifier: 3 classes" in run


def _toy_run(row, seed, folder, spec):
    """A real (tiny) computation per (row, seed): the least-squares slope of 50 noisy points
    y = row's slope * x + noise(seed); its error against the true slope."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 50)
    y = row.note["slope"] * x + rng.normal(0, row.note["noise"], 50)
    slope = float(np.polyfit(x, y, 1)[0])
    return {"slope": slope, "error": abs(slope - row.note["slope"])}


def test_toy_study_end_to_end(tmp_path):
    """The study engine on two rows x two seeds: runs, caches (a rerun runs nothing), and writes
    the table (mean, range, 95% t-interval), the JSON with its provenance, and the figure."""
    calls = []

    def run(row, seed, folder, spec):
        calls.append((row.key, seed))
        return _toy_run(row, seed, folder, spec)

    rows = [Row("steep", "slope 2", note={"slope": 2.0, "noise": 0.1}),
            Row("flat", "slope 0.5", note={"slope": 0.5, "noise": 0.3})]  # fmt: skip
    metrics = [Metric("slope", "slope", digits=3), Metric("error", "error", digits=3)]
    study = Study("toy", tmp_path, rows, (0, 1), {"points": 50},
                  lambda row, seed: {"slope": row.note["slope"]}, run, metrics)  # fmt: skip
    results = run_study(study)
    assert sorted(calls) == [("flat", 0), ("flat", 1), ("steep", 0), ("steep", 1)]
    summary = summarise_study(study, results)
    write_study(tmp_path, "toy", summary, study_table(summary, metrics),
                lambda p: plot_study(summary, metrics, p, "toy"))  # fmt: skip
    data = json.loads((tmp_path / "toy.json").read_text())
    for row in rows:  # independent: the two fits again, then mean, range and t-interval
        slopes = [_toy_run(row, s, None, None)["slope"] for s in (0, 1)]
        got = next(r for r in data["rows"] if r["key"] == row.key)["slope"]
        mean, sd = np.mean(slopes), np.std(slopes, ddof=1)
        half = 12.706 * sd / np.sqrt(2)  # t(0.975, 1 d.f.) from a statistics table
        assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(sd)
        assert (got["min"], got["max"]) == (min(slopes), max(slopes))
        assert got["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-4)
        line = next(x for x in (tmp_path / "toy.md").read_text().splitlines()
                    if x.startswith(f"| {row.label} |"))  # fmt: skip
        assert f"| {mean:.3f} ({min(slopes):.3f}-{max(slopes):.3f}) |" in line
        assert f"| [{mean - half:.3f}, {mean + half:.3f}] |" in line
    assert "| slope 95% CI |" in (tmp_path / "toy.md").read_text()
    prov = data["provenance"]
    assert prov["torch"] == torch.__version__ and prov["date"] and prov["cpu"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent)  # fmt: skip
    if head.returncode == 0:  # run from a checkout: the commit is this one
        assert prov["commit"] == head.stdout.strip()
    assert Image.open(tmp_path / "toy.png").size[0] > 400
    assert (tmp_path / "runs" / "steep-seed1" / "result.json").exists()
    calls.clear()  # a rerun reuses every run; a changed spec reruns that row only
    assert run_study(study) == results and calls == []
    study.rows = [rows[0], Row("flat", "slope 0.5", note={"slope": 0.7, "noise": 0.3})]
    run_study(study)
    assert sorted(calls) == [("flat", 0), ("flat", 1)]


def test_t_quantiles_against_scipy():
    """The fallback t table (used without scipy) against scipy's quantiles."""
    stats = pytest.importorskip("scipy.stats")
    from alexnet.experiments import common

    for df in range(1, 31):
        assert common._T95[df - 1] == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
    for df in (40, 60, 120, 1000):  # the large-df approximation
        assert 1.96 + 2.5 / df == pytest.approx(stats.t.ppf(0.975, df), abs=3e-3)
    s = common.seed_stats([1.0, 2.0, 4.0, None])
    assert s["mean"] is None and s["reached"] == 3 and (s["min"], s["max"]) == (1.0, 4.0)


def test_study_commands_flags_have_help_and_no_abbreviations(capsys):
    """The one registration serves figure1, ablate, recipes and finetune: every flag says what
    it does, and a shortened flag is an error, not a guess."""
    import argparse

    from alexnet.commands import experiments as E

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    E.register(sub)
    for c in E.STUDIES:
        p = sub.choices[c.name]
        assert p.description == c.module.__doc__ and not p.allow_abbrev
        for a in p._actions:
            assert a.help, (c.name, a.option_strings)
        with pytest.raises(SystemExit):
            parser.parse_args([c.name, "--ou", "x"])
    args = parser.parse_args(["figure1", "--quick", "--net", "layers-80sec", "--seeds", "1"])
    cfg = E.figure1_config(args)
    assert (cfg.net, cfg.seeds, cfg.epochs, cfg.out) == ("layers-80sec", 1, 3, "runs/figure1")
    args = parser.parse_args(["ablate", "--quick", "--only", "lrn", "--set", "train.lr=0.1"])
    cfg = E.ablate_config(args)
    assert (cfg.steps, cfg.only, cfg.sets, cfg.store_limit) == (24, ("lrn",), ("train.lr=0.1",),
                                                                2000)  # fmt: skip
    # recipes: --quick fills what is not given; --controls names rows (baseline always first).
    cfg = E.recipes_config(parser.parse_args(["recipes", "--quick", "--control-steps", "20"]))
    assert (cfg.recipes, cfg.epochs, cfg.controls, cfg.control_steps, cfg.store_limit) == (
        ("paper",), 1, ("baseline", "init03"), 20, 2000)  # fmt: skip
    cfg = E.recipes_config(parser.parse_args(["recipes", "--controls", "alpha5,inverted"]))
    assert cfg.controls == ("baseline", "alpha5", "inverted") and cfg.epochs == 3
    assert cfg.recipes == ("paper", "cuda-convnet") and cfg.store_limit is None
    cfg = E.recipes_config(parser.parse_args(["recipes", "--controls", "all", "--epochs", "0"]))
    assert len(cfg.controls) == 11 and cfg.recipes == ()
    with pytest.raises(ValueError, match="--controls 'bogus': valid rows are baseline"):
        E.recipes_config(parser.parse_args(["recipes", "--controls", "bogus"]))
    capsys.readouterr()


def test_leave_chance_step_and_paired_deltas_by_hand():
    """recipes' leave-chance rule (the first logged loss that, with the next two, is below
    chance - margin) and the engine's paired deltas, against values worked out by hand."""
    from alexnet.experiments import common, recipes

    steps = [10, 20, 30, 40, 50, 60]
    chance = 2.302585  # ln 10
    # 20 dips below 2.2 once, then 40, 50, 60 stay below: the step is 40, not 20.
    losses = [2.31, 2.10, 2.25, 2.15, 2.0, 1.9]
    assert recipes.leave_chance_step(steps, losses, chance, 0.1) == 40
    assert recipes.leave_chance_step(steps, losses[:5], chance, 0.1) is None  # 2 points left
    assert recipes.loss_at(steps, losses, 30) == 2.25 and recipes.loss_at(steps, losses, 35) is None
    # Logged means over steps 1, 2-10, 11-20 (step 1 alone): steps 1-20's mean weights them
    # 1, 9 and 10: (3.0 + 9 * 2.0 + 10 * 1.0) / 20 = 1.55 (the plain mean of the three: 2.0).
    assert common.mean_loss_to([1, 10, 20, 30], [3.0, 2.0, 1.0, 0.5], 20) == pytest.approx(1.55)
    derive = common.paired_deltas(
        lambda k: "base" if k != "base" else None, {"d": "err"}, scale=100
    )
    res = {"base": [{"err": 0.50}, {"err": 0.40}], "row": [{"err": 0.55}, {"err": 0.30}]}
    out = derive(res)
    assert list(out) == ["row"] and out["row"]["d"] == pytest.approx([5.0, -10.0])
