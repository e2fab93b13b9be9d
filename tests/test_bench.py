"""`alexnet bench model` in quick mode: the JSON's structure, positive figures, and ratios that
follow from the rows by their documented definitions. Also speed.FastMode's labels and the
allocator setting."""

from __future__ import annotations

import json
import time

import pytest
import torch

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
        # The fraction is of this machine's matmul in the row's dtype, measured in the run.
        assert row["matmul_peak_gflops"] == r["peak_gflops"][row["matmul_peak_dtype"]]
        assert row["fraction_of_matmul_peak"] == pytest.approx(
            row["train_gflops"] / row["matmul_peak_gflops"]
        )
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


def test_make_jpegs_in_parallel_makes_the_same_files(tmp_path):
    """The benchmarks' JPEGs made by several processes are the very files one process makes
    (each image a function of (seed, i)), ImageNet-sized, in an ImageFolder tree."""
    from PIL import Image

    from alexnet.benchmarks.data import make_jpegs

    one, two = tmp_path / "one", tmp_path / "two"
    total = make_jpegs(one, 10, classes=3, seed=4, workers=1)
    assert make_jpegs(two, 10, classes=3, seed=4, workers=3) == total
    files = sorted(p.relative_to(one) for p in one.rglob("*.jpg"))
    assert len(files) == 10 and sorted(p.relative_to(two) for p in two.rglob("*.jpg")) == files
    assert sorted(d.name for d in one.iterdir()) == ["class0", "class1", "class2"]
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    sizes = {Image.open(one / f).size for f in files}
    assert sizes <= {(500, 375), (375, 500)}
    assert total == sum((one / f).stat().st_size for f in files)
    assert make_jpegs(tmp_path / "three", 10, classes=3, seed=5) != total  # the seed matters


@pytest.mark.slow
def test_bench_e2e_at_its_smallest(tmp_path, capsys):
    """`alexnet bench e2e` on the CPU at its smallest: both loops timed, the JSON's rates and
    ratio consistent, GPU busy absent off CUDA, and its BENCHMARKS.md section written."""
    md = tmp_path / "BENCHMARKS.md"
    args = ["bench", "e2e", "--images", "48", "--steps", "2", "--warmup", "1", "--batch-size",
            "8", "--workers", "1", "--device", "cpu", "--json", "--markdown", str(md)]  # fmt: skip
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    loops = [(row["loop"], row["decode"]) for row in r["rows"]]
    assert loops == [("ours", "cpu"), ("reference", "cpu")]
    ours, ref = r["rows"]
    assert ours["images_per_s"] > 0 and ref["images_per_s"] > 0
    assert ours["mode"] == default_fast_mode("cpu").label and ref["mode"] == "fp32"
    assert r["ratio_best"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"])
    assert ours["gpu_busy_percent"] is None and r["decode_auto"] is None
    assert r["settings"]["images"] == 48 and "--batch-size 8" in r["settings"]["command"]
    text = md.read_text()
    assert "<!-- alexnet bench e2e: begin -->" in text and f"| {ours['images_per_s']:.0f} |" in text
    assert main(["bench", "e2e", "--decode", "tpu", "--images", "48", "--device", "cpu"]) == 2


class _FakeNvml:
    """nvidia-ml-py's calls GpuBusy makes, with samples before, inside and after a window."""

    NVML_GPU_UTILIZATION_SAMPLES = 1

    def __init__(self, samples_supported: bool):
        import types

        self.supported, self.types = samples_supported, types
        self.since = None

    def nvmlDeviceGetSamples(self, handle, kind, since_us):
        if not self.supported:
            raise RuntimeError("Not Supported")
        self.since = since_us
        s = self.types.SimpleNamespace
        mk = lambda ts, v: s(timeStamp=int(ts), sampleValue=s(uiVal=v))  # noqa: E731
        # one sample from before the window (warm-up), three inside, one from the future
        return 0, [mk(since_us - 5e5, 0), mk(since_us + 1, 90), mk(since_us + 2, 96),
                   mk(since_us + 3, 99), mk(time.time() * 1e6 + 1e7, 0)]  # fmt: skip

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self.types.SimpleNamespace(gpu=42)


@pytest.mark.parametrize("supported", [True, False])
def test_gpu_busy_counts_the_timed_window_only(supported):
    from alexnet.benchmarks.e2e import GpuBusy

    busy = GpuBusy(torch.device("cpu"), poll_s=0.005)
    assert busy._nvml is None  # off CUDA: no figure
    with busy:
        pass
    assert busy.percent is None
    busy._nvml, busy._handle = _FakeNvml(supported), object()
    with busy:
        time.sleep(0.05)
    if supported:  # the driver's samples between start and stop, not before or after
        assert busy.method == "nvml samples" and busy.samples == 3
        assert busy.percent == pytest.approx((90 + 96 + 99) / 3)
    else:  # polled in the process meanwhile
        assert busy.method.startswith("nvml polled") and busy.samples >= 2
        assert busy.percent == 42


def test_bench_convs_rows_and_ratios(tmp_path, capsys):
    """`alexnet bench convs` at its smallest: every (layer, variant, mode, cudnn.benchmark) timed,
    the ratios those of the rows, the section written, and cudnn.benchmark restored."""
    md = tmp_path / "B.md"
    before = torch.backends.cudnn.benchmark
    args = ["bench", "convs", "--device", "cpu", "--batch-size", "2", "--steps", "1",
            "--warmup", "0", "--json", "--markdown", str(md)]  # fmt: skip
    assert main(args) == 0
    assert torch.backends.cudnn.benchmark == before
    r = json.loads(capsys.readouterr().out)
    keys = {(x["layer"], x["variant"], x["mode"], x["cudnn_benchmark"]) for x in r["rows"]}
    assert len(keys) == len(r["rows"]) == 20  # conv1: 3 forms, conv2: 2; x 2 modes x 2
    assert all(x["ms"] > 0 for x in r["rows"])
    ms = {(x["layer"], x["variant"], x["mode"], x["cudnn_benchmark"]): x["ms"] for x in r["rows"]}
    want = ms["conv2", "grouped", "bf16+cl", True] / ms["conv2", "two dense", "bf16+cl", True]
    assert r["ratios"]["conv2_grouped_over_two_dense_bf16_cl_benchmark"] == pytest.approx(want)
    want = ms["conv1", "4x4 blocks", "fp32", False] / ms["conv1", "dense", "fp32", False]
    assert r["ratios"]["conv1_blocks_over_dense_fp32"] == pytest.approx(want)
    want = ms["conv1", "two towers", "bf16+cl", False] / ms["conv1", "dense", "bf16+cl", False]
    assert r["ratios"]["conv1_two_towers_over_dense_bf16_cl"] == pytest.approx(want)
    assert "<!-- alexnet bench convs: begin -->" in md.read_text()


def test_bench_table_prints_each_rows_matmul_rate_and_fraction():
    """Issue 20, part 4: beside img/s, each row prints the machine's matmul rate it is measured
    against (in its dtype) and the step's fraction of it."""
    from alexnet.benchmarks.model import format_table

    row = dict(train_images_per_s=20.0, train_images_per_s_best=21.0, infer_images_per_s=50.0,
               cpu_ms_per_train_image=40.0)  # fmt: skip
    result = {
        "rows": [
            row
            | dict(
                model="paper",
                mode="fp32",
                train_gflops=87.0,
                matmul_peak_dtype="fp32",
                matmul_peak_gflops=174.0,
                fraction_of_matmul_peak=0.5,
            ),
            row
            | dict(
                model="paper",
                mode="bf16+cl",
                train_gflops=80.0,
                matmul_peak_dtype="bf16",
                matmul_peak_gflops=800.0,
                fraction_of_matmul_peak=0.1,
            ),
        ],  # fmt: skip
        "peak_gflops": {"fp32": 174.0, "bf16": 800.0},
        "settings": {"batch_size": 64, "steps": 3, "peak_size": 2048},
        "ratios": {},
        "fastest": {},
        "machine": {"cpu": "x", "cores": 2, "torch": "t", "date": "d"},
    }
    lines = format_table(result).splitlines()
    assert "matmul GFLOP/s" in lines[0] and "fraction" in lines[0]
    assert lines[2].split()[-3:] == ["fp32", "174", "50%"]
    assert lines[3].split()[-3:] == ["bf16", "800", "10%"]
    assert "2048^3 matmul, measured in the same run (fp32 174 GFLOP/s, bf16 800 GFLOP/s)" in (
        format_table(result)
    )
