"""`alexnet ablate`: every row of the paper's ablations in the table, paired deltas against the
baseline, the paper's numbers beside ours, and resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alexnet.experiments import ablate as A
from alexnet.experiments.common import fit_schedule, select_rows

ROWS = ["baseline", "lrn", "pool", "lighting", "dropout", "towers", "conv3", "conv4", "conv5"]
# The paper's deltas (docs/facts.md), variant minus baseline, in points of top-1 / top-5.
PAPER = {"lrn": ("+1.4", "+1.2"), "pool": ("+0.4", "+0.3"), "towers": ("+1.7", "+1.2")}

# What each row changes in the recipe (section, field, value), as config.json records it.
CHANGED = {
    "lrn": ("model", "lrn", False),
    "pool": ("model", "pool", "nonoverlap"),
    "lighting": ("data", "lighting_std", 0),
    "dropout": ("model", "dropout", 0),
    "towers": ("model", "towers", 1),
    "conv3": ("model", "drop_conv", 3),
    "conv4": ("model", "drop_conv", 4),
    "conv5": ("model", "drop_conv", 5),
}


def test_variants_cover_the_paper_and_build():
    assert [v.key for v in A.VARIANTS] == ROWS
    for key, (t1, t5) in PAPER.items():
        note = A.BY_KEY[key].note
        assert (note["paper_delta_top1"], note["paper_delta_top5"]) == (t1, t5)
    assert "1" in A.BY_KEY["lighting"].note["paper_delta_top1"]  # "over 1%" (Sec. 4.1)
    for k in ("conv3", "conv4", "conv5"):
        assert "2" in A.BY_KEY[k].note["paper_delta_top1"]  # "about 2%" (Sec. 7)
    cfg = A.AblateConfig(batch_size=16)
    for v in A.VARIANTS:  # every override is a valid profile change
        p = A.variant_profile(cfg, v)
        assert p.train.batch_size == 16
    assert A.variant_profile(cfg, A.BY_KEY["lrn"]).model.lrn is False
    assert A.variant_profile(cfg, A.BY_KEY["pool"]).model.pool == "nonoverlap"
    assert A.variant_profile(cfg, A.BY_KEY["lighting"]).data.lighting_std == 0
    assert A.variant_profile(cfg, A.BY_KEY["dropout"]).model.dropout == 0
    assert A.variant_profile(cfg, A.BY_KEY["towers"]).model.towers == 1
    assert A.variant_profile(cfg, A.BY_KEY["conv4"]).model.drop_conv == 4
    # The baseline is the paper's net whatever the base recipe (Sec. 3.2-4.2: two towers, LRN,
    # overlapping pooling, PCA lighting std 0.1, dropout 0.5, all five conv layers) ...
    for profile in ("demo", "paper", "caffe"):
        base = A.variant_profile(A.AblateConfig(profile=profile), A.BY_KEY["baseline"])
        m = base.model
        assert (m.lrn, m.pool, m.dropout, m.towers, m.drop_conv) == (True, "overlap", 0.5, 2, None)
        assert base.data.lighting_std == 0.1
    # ... and each row differs from it in one field only.
    base = A.variant_profile(cfg, A.BY_KEY["baseline"])
    for v in A.VARIANTS[1:]:
        p = A.variant_profile(cfg, v)
        diff = [(sec, f) for sec in ("model", "data", "train")
                for f in getattr(p, sec).__dataclass_fields__
                if getattr(getattr(p, sec), f) != getattr(getattr(base, sec), f)]  # fmt: skip
        assert len(diff) == 1, (v.key, diff)
    keys = [v.key for v in A.VARIANTS[1:]]
    assert select_rows("conv,lrn,conv4", keys, "--only", {"conv": A.CONV}) == (
        "conv3", "conv4", "conv5", "lrn")  # fmt: skip
    with pytest.raises(ValueError, match="--only 'bogus': valid rows"):
        select_rows("lrn,bogus", keys, "--only", {"conv": A.CONV})


def test_schedule_fits_the_budget():
    cfg = A.AblateConfig(batch_size=32, steps=30)
    p = A.variant_profile(cfg, A.BY_KEY["baseline"], n_train=2000)
    # 30 steps of 32 fit in one epoch of 2000: one epoch of exactly 960 images.
    assert (p.train.epochs, p.train.epoch_images, p.train.batch_size) == (1, 960, 32)
    p = fit_schedule(p, 100, 2000)  # 62 batches per epoch: 2 epochs hold 100 steps
    assert (p.train.epochs, p.train.epoch_images) == (2, None)
    p = fit_schedule(p, 3, 40)  # one batch of 32 per epoch: 3 epochs
    assert p.train.epochs == 3
    with pytest.raises(ValueError, match="fewer than a batch"):
        fit_schedule(p, 3, 16)


def test_table_holds_every_row_with_paired_deltas(tiny_store):
    from alexnet.data import open_store
    from alexnet.experiments.common import summarise_study

    rng = np.random.default_rng(0)
    results = {}
    for v in A.VARIANTS:
        results[v.key] = [
            {
                "spec": {"seed": s, "store": str(tiny_store), "profile": {"name": v.key}},
                "val_top1_error": float(rng.uniform(0.3, 0.7)),
                "val_top5_error": float(rng.uniform(0.0, 0.2)),
                "train_top1_error": float(rng.uniform(0.2, 0.6)),
                "seconds": 1.0,
                "steps": 10,
                "batch_size": 12,
                "images_seen": 120,
                "val_images": 12,
            }
            for s in (0, 1)
        ]
    cfg = A.AblateConfig(seeds=2, steps=10, batch_size=12)
    st = open_store(tiny_store)
    study = A.ablate_study(cfg, tiny_store)
    summary = A.summarise(cfg, summarise_study(study, results), results, st)
    assert [r["key"] for r in summary["rows"]] == ROWS
    assert summary["baseline_profile"] == {"name": "baseline"}  # what the runs recorded
    assert summary["provenance"]["torch"] and summary["provenance"]["date"]
    base = results["baseline"]
    for row in summary["rows"]:
        rs = results[row["key"]]
        # Independent: per-seed differences in points, then their mean and sample std.
        d1 = [100 * (rs[s]["val_top1_error"] - base[s]["val_top1_error"]) for s in (0, 1)]
        d5 = [100 * (rs[s]["val_top5_error"] - base[s]["val_top5_error"]) for s in (0, 1)]
        assert row["delta_top1"]["mean"] == pytest.approx(sum(d1) / 2)
        assert row["delta_top5"]["mean"] == pytest.approx(sum(d5) / 2)
        sd = abs(d1[0] - d1[1]) / np.sqrt(2)
        assert row["delta_top1"]["std"] == pytest.approx(sd)
        # 95% t-interval of two seeds: mean ± 12.706 (t, 1 d.f., a statistics table) sd / √2
        half = 12.706 * sd / np.sqrt(2)
        assert row["delta_top1"]["ci95"] == pytest.approx([sum(d1) / 2 - half, sum(d1) / 2 + half],
                                                          abs=2e-3 * sd)  # fmt: skip
        assert row["val_top1_error"]["mean"] == pytest.approx(
            (rs[0]["val_top1_error"] + rs[1]["val_top1_error"]) / 2
        )
    md = A.ablate_markdown(summary)
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert len(lines) == 1 + len(ROWS)  # header + one per row
    assert "Δ top-1 95% CI" in lines[0]
    for v, line in zip(A.VARIANTS, lines[1:], strict=True):
        assert line.startswith(f"| {v.label} |")
        if v.key in PAPER:
            assert f"| {PAPER[v.key][0]} | {PAPER[v.key][1]} |" in line
    d = summary["rows"][1]["delta_top1"]
    assert f"| {d['mean']:.1f} ({d['min']:.1f}-{d['max']:.1f}) |" in lines[2]
    assert f"| [{d['ci95'][0]:.1f}, {d['ci95'][1]:.1f}] |" in lines[2]
    assert "Caveat" in md and "not resolvable" in md


@pytest.mark.slow  # nine 1-step runs of the paper net at 224x224 (~60 s on 2 cores)
def test_ablate_runs_every_row_and_resumes(tiny_store, tmp_path):
    cfg = A.AblateConfig(
        out=str(tmp_path / "abl"),
        data=str(tiny_store),
        seeds=1,
        steps=1,
        batch_size=12,
        val_limit=6,
        workers=0,
    )
    summary = A.run_ablate(cfg)
    out = tmp_path / "abl"
    data = json.loads((out / "ablate.json").read_text())
    assert [r["key"] for r in data["rows"]] == ROWS
    md = (out / "ablate.md").read_text()
    for v in A.VARIANTS:
        assert f"| {v.label} |" in md
    for r in data["rows"]:
        res = json.loads((out / "runs" / f"{r['key']}-seed0" / "result.json").read_text())
        assert res["steps"] == 1 and res["batch_size"] == 12 and res["val_images"] == 6
        assert res["spec"]["sets"] == list(A.BY_KEY[r["key"]].sets)
        # the run trained the variant it claims (its config.json holds the override)
        conf = json.loads((out / "runs" / f"{r['key']}-seed0" / "config.json").read_text())
        if r["key"] in CHANGED:
            section, field, value = CHANGED[r["key"]]
            assert conf["profile"][section][field] == value
        # the budget is the recipe's whole schedule: one epoch of 1 step x 12 images
        assert (conf["profile"]["train"]["epochs"], conf["profile"]["train"]["epoch_images"]) == (
            1,
            12,
        )
        assert res["spec"]["profile"] == conf["profile"]
        assert r["val_top1_error"]["mean"] == pytest.approx(res["val_top1_error"])
        # disk: only the baseline's weights are kept, no training state
        kept = (out / "runs" / f"{r['key']}-seed0" / "model.safetensors").exists()
        assert kept == (r["key"] == "baseline")
        assert not (out / "runs" / f"{r['key']}-seed0" / "state.pt").exists()
    assert (out / "ablate.png").stat().st_size > 0
    # A rerun trains nothing and gives the same table.
    mtimes = sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json"))
    again = A.run_ablate(cfg)
    assert sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")) == mtimes
    assert again["rows"] == summary["rows"]
