"""bench/gpu.sh, the one command for a lent GPU machine, run here in its --dry-run (the same steps
on the CPU with tiny sizes), so that the script cannot rot between the rare GPU runs: every step
runs and is reported, a step that overruns its budget is cut and reported while the others still
run, and $OUT holds the files the GPU run brings back (at most 8, at most 16 MiB each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
sys.path.insert(0, str(ROOT / "bench"))

import gpu_report  # noqa: E402  (bench/ is not a package)


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (make setup)")  # fmt: skip
def test_gpu_script_dry_run(tmp_path):
    env = dict(
        os.environ,
        GPU_DATA=str(tmp_path / "carry"),
        OUT=str(tmp_path / "out"),
        GPU_WORK=str(tmp_path / "work"),
        PYTHON=sys.executable,
        B_CONVS="1",
    )  # fmt: skip  (one step that cannot fit its budget: cut, reported)
    carry = subprocess.run(["bash", "bench/gpu_carry.sh"], cwd=ROOT, env=env, text=True,
                           capture_output=True)  # fmt: skip
    assert carry.returncode == 0, carry.stderr
    copied = sorted(p.name for p in (tmp_path / "carry" / "fashion-mnist").iterdir())
    assert copied == sorted(p.name for p in FASHION_MNIST.glob("*-ubyte.gz"))

    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=1500)  # fmt: skip
    log = run.stdout
    assert run.returncode == 1, log[-3000:]  # the cut step makes it 1; all of them ran
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["BENCHMARKS.md", "evidence.tar.gz", "gpu.log", "machine.txt",
                     "results.json", "summary.md"]  # fmt: skip
    assert all(p.is_file() and p.stat().st_size < 16 << 20 for p in out.iterdir())
    assert f"from {tmp_path / 'carry' / 'fashion-mnist'}" in log  # the carried copy was used

    r = json.loads((out / "results.json").read_text())
    status = {s["step"]: s["status"] for s in r["steps"]}
    assert status.pop("2b bench convs") == "timeout after 1 s"
    assert set(status.values()) == {"ok"}, status
    steps = ["1 checks", "prepare store", "2a bench model", "3 bench e2e", "4a recipes",
             "4b ablate", "2c bench model +compile"]  # fmt: skip
    assert sorted(status) == sorted(steps)  # (4a and 4b run in parallel: either order)
    checks = r["checks"]["checks"]
    assert len(checks) == 5 and all(c["ok"] for c in checks.values())
    assert {(x["model"], x["mode"]) for x in r["bench_model"]["rows"]} == {
        (m, mode) for m in ("paper", "torchvision") for mode in ("fp32", "bf16+cl")}  # fmt: skip
    assert r["bench_convs"] is None  # cut
    assert [x["loop"] for x in r["bench_e2e"]["rows"]] == ["ours", "reference"]
    assert set(r["recipes"]["recipes"]) == {"paper", "cuda-convnet"}
    assert all(len(x["epochs"]) == 1 for x in r["recipes"]["recipes"].values())
    rows = [x["key"] for x in r["ablate"]["rows"]]
    assert rows == ["baseline", "lrn"]  # the dry run's one row (on a GPU: added one at a time)
    assert r["bench_model_compile"]["rows"]

    md = (out / "BENCHMARKS.md").read_text()
    for name in ("bench model, tuned loop", "bench e2e", "bench data, 2 workers"):  # last: kept
        assert f"<!-- alexnet {name}: begin -->" in md, name
    with tarfile.open(out / "evidence.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ("recipes.md", "recipes.json", "recipes.png", "ablate.md", "ablate.json",
              "ablate.png"):  # fmt: skip
        assert f"docs/figures/gpu/{f}" in names
    summary = (out / "summary.md").read_text()
    assert summary.strip() in log  # printed last
    assert log.rstrip().endswith(summary.strip().splitlines()[-1])
    assert "| 2b bench convs | timeout after 1 s |" in summary and "5/5 passed" in summary
    assert (out / "gpu.log").read_text().strip() == log.strip()


def test_report_of_a_run_cut_short(tmp_path):
    """The report reads whatever the steps left: nothing at all, or a step's unreadable JSON."""
    text, results = gpu_report.build(tmp_path)
    assert results["steps"] == [] and "checks: no result" in text
    (tmp_path / "steps.tsv").write_text("1 checks\t60\t61\ttimeout after 60 s\n")
    check = {"ok": False, "seconds": 1, "error": "AssertionError: x"}
    (tmp_path / "checks.json").write_text(json.dumps({"device": "cuda", "checks": {"a": check}}))
    (tmp_path / "bench-e2e.json").write_text("{")  # cut mid-write
    (tmp_path / "bench-model.json").write_text('{"rows": []}')  # no settings: unreadable
    text, results = gpu_report.build(tmp_path)
    assert "| 1 checks | timeout after 60 s | 61 | 60 |" in text
    assert "0/1 passed" in text and "FAILED a: AssertionError: x" in text
    assert "bench_e2e: no result" in text and "bench_model: unreadable result" in text


@pytest.mark.slow
def test_gpu_script_reruns_only_the_steps_named(tmp_path):
    """GPU_STEPS (a partial rerun within the device time left): only the named steps run, the
    others are listed as not selected, and that is not a failure."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable, GPU_STEPS="2b")  # fmt: skip
    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    status = {s["step"]: s["status"] for s in r["steps"]}
    assert status.pop("2b bench convs") == "ok" and r["bench_convs"]["rows"]
    assert set(status.values()) == {"skipped: not in GPU_STEPS"}, status
    assert not (tmp_path / "work" / "fashion-mnist").exists()  # no store without step 4
