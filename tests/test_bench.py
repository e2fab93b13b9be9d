"""`alexnet bench model` in quick mode: the JSON's structure, positive figures, and ratios that
follow from the rows by their documented definitions. Also speed.FastMode's labels and the
allocator setting."""

from __future__ import annotations

import json

import pytest

from alexnet.commands import main
from alexnet.speed import FastMode, default_fast_mode, tune_cpu_allocator


@pytest.fixture(scope="module")
def quick_result():
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(
            ["bench", "model", "--quick", "--json", "--profiles", "paper,torchvision"]
            + ["--modes", "fp32,fp32+cl", "--num-classes", "1000"]
        )
    assert code == 0
    return json.loads(buf.getvalue())


@pytest.mark.slow
def test_quick_json_structure(quick_result):
    r = quick_result
    assert set(r) >= {"rows", "ratios", "machine", "fastest", "peak_gflops", "settings"}
    pairs = {(row["model"], row["mode"]) for row in r["rows"]}
    assert pairs == {(m, mode) for m in ("paper", "torchvision") for mode in ("fp32", "fp32+cl")}
    for row in r["rows"]:
        for key in ("train_images_per_s", "infer_images_per_s", "train_gflops"):
            assert row[key] > 0, (row, key)
        assert 0 < row["fraction_of_matmul_peak"]
        assert len(row["train_step_s"]) == r["settings"]["steps"] == 2
        assert row["train_images_per_s"] <= row["train_images_per_s_best"] + 1e-9
    m = r["machine"]
    assert m["cores"] >= 1 and m["torch"] and m["date"] and m["cpu"]
    assert r["peak_gflops"]["fp32"] > 0
    # docs/facts.md's forward multiply-adds (1000 classes): 724M (two towers), 714M (torchvision).
    assert r["forward_gflops_per_image"]["paper"] == pytest.approx(2 * 0.7244, rel=2e-3)
    assert r["forward_gflops_per_image"]["torchvision"] == pytest.approx(2 * 0.7142, rel=2e-3)


@pytest.mark.slow
def test_quick_ratios_follow_from_rows(quick_result):
    rows = {(row["model"], row["mode"]): row for row in quick_result["rows"]}
    ratios = quick_result["ratios"]
    base = rows["torchvision", "fp32"]["train_images_per_s"]

    def train(model, mode):
        return rows[model, mode]["train_images_per_s"]

    paper_fp32 = max(train("paper", "fp32"), train("paper", "fp32+cl"))
    assert ratios["paper_fp32_vs_torchvision_fp32"] == pytest.approx(paper_fp32 / base)
    assert ratios["fastest_vs_torchvision_fp32"] == pytest.approx(paper_fp32 / base)
    assert ratios["paper_vs_torchvision_same_mode_fp32"] == pytest.approx(
        train("paper", "fp32") / base
    )
    assert ratios["paper_vs_torchvision_same_mode_fp32_cl"] == pytest.approx(
        train("paper", "fp32+cl") / train("torchvision", "fp32+cl")
    )
    fastest = quick_result["fastest"]["paper"]
    assert train("paper", fastest) == max(train("paper", m) for m in ("fp32", "fp32+cl"))
    tv_best = max(train("torchvision", m) for m in ("fp32", "fp32+cl"))
    assert ratios["torchvision_fastest_vs_torchvision_fp32"] == pytest.approx(tv_best / base)


def test_bench_model_rejects_bad_arguments(capsys):
    assert main(["bench", "model", "--quick", "--profiles", "alexnet2"]) == 2
    assert "unknown profile" in capsys.readouterr().err
    assert main(["bench", "model", "--quick", "--modes", "fp33"]) == 2
    assert "unknown mode" in capsys.readouterr().err


def test_fast_mode_labels_round_trip():
    for mode in (
        FastMode(),
        FastMode(channels_last=True),
        FastMode(autocast_dtype="bfloat16"),
        FastMode(True, "bfloat16", True),
    ):
        assert FastMode.from_label(mode.label) == mode
    assert FastMode(True, "bfloat16").label == "bf16+cl"
    assert default_fast_mode("cuda") == FastMode(True, "bfloat16")
    assert default_fast_mode("cpu").channels_last


def test_tune_cpu_allocator_is_idempotent():
    first = tune_cpu_allocator()
    assert tune_cpu_allocator() == first
