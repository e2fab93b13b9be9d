"""Data parallel training (torchrun, gloo on 2 CPU processes) against the one-process run."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alexnet import checkpoint
from alexnet.commands import main as cli_main
from alexnet.model import build_model
from test_train import steps_logged, weights


def torchrun(nproc: int, args: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "alexnet", "train", *args]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # fmt: skip


# A well-conditioned recipe (the demo's: He init, standardised inputs) so that float summation
# order, the only allowed difference, is not amplified by a chaotic start; 4 steps of 8 per epoch;
# the paper's dropout, whose masks the ranks must share out exactly.
DDP_ARGS = [
    "--profile", "demo", "--epochs", "2", "--batch-size", "8", "--seed", "3", "--no-fast",
    "--log-every", "1", "--val-limit", "6", "--workers", "0", "--set", "train.epoch_images=32",
    "--set", "train.lr=0.0005", "--set", "model.dropout=0.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process_run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert cli_main(["train", "--data", str(tiny_store), "--out", str(out), *DDP_ARGS]) == 0
    return out


def assert_same_weights(a, b, seed=3, num_classes=3):
    """The runs agree to a small fraction of what training changed: float summation order
    (half batches, other thread counts) is the only difference allowed. A wrong shard, a lost
    or doubled gradient would differ by the order of the change itself."""
    torch.manual_seed(seed)
    init = build_model("demo", num_classes=num_classes).state_dict()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() == init.keys()
    ratios = {}
    for k in wa:
        trained = (wa[k] - init[k]).abs().max().item()
        assert trained > 0, k
        ratios[k] = (wb[k] - wa[k]).abs().max().item() / trained
    print(ratios)
    assert max(ratios.values()) <= 0.05, ratios


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_same_global_batch(one_process_run, tiny_store, tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(2, ["--data", str(tiny_store), "--out", str(out), *DDP_ARGS])
    text, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, text
    # The global batch (8) is split 4 + 4; the dropout masks are the global batch's (model.py).
    assert_same_weights(one_process_run, out)


@pytest.mark.slow
def test_two_ranks_killed_then_resumed_on_one_rank(one_process_run, tiny_store, tmp_path):
    out = tmp_path / "ddp-killed"
    args = ["--data", str(tiny_store), "--out", str(out), *DDP_ARGS, "--checkpoint-every", "2"]
    proc = torchrun(2, args, start_new_session=True)
    t0 = time.time()
    while steps_logged(out) < 5:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 400, "timed out"
        time.sleep(0.05)
    # The launcher and both ranks, at once. torchrun starts each rank in a session of its own,
    # so killing the launcher's process group would leave the ranks training on, writing the
    # run folder (the resume below would then, rightly, find it in use).
    ranks = list(rank_pids(proc.pid).values())
    assert len(ranks) == 2
    for pid in [proc.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    # The killed rank 0's lock on the run folder goes when its last thread has exited.
    while not lock_is_free(out):
        assert time.time() - t0 < 400, "the killed rank 0 does not exit"
        time.sleep(0.05)
    # Resume with a different number of ranks: one process continues the same run.
    assert cli_main(["train", "--resume", str(out)]) == 0
    assert_same_weights(one_process_run, out)


# --- the paper's model parallelism (Sec. 3.2): two towers on two devices ----------------------


def test_model_parallel_training_step_equals_the_one_device_step():
    """One PaperSGD step of the two-tower net split over devices=["cpu", "cpu"] (each tower's
    half of every layer a separate parameter) against the one-device net, in float64: the same
    weights after the step, to rounding. A tower reading the wrong half at conv3 or the fc layers
    (where the towers communicate) or a gradient lost at a device crossing would differ by O(1)."""
    from alexnet.config import get_profile
    from alexnet.optim import make_optimizer

    train = get_profile("paper").train
    nets = []
    for devices in (["cpu"], ["cpu", "cpu"]):
        torch.manual_seed(0)
        net = build_model("demo", num_classes=5, devices=devices, dropout=0.5).double()
        opt = make_optimizer(net, train)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(6, 3, 224, 224, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (6,), generator=gen)
        torch.manual_seed(2)  # the dropout masks
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nets.append(net)
    assert len(list(nets[1].parameters())) == 2 * len(list(nets[0].parameters()))  # really split
    one, two = nets[0].state_dict(), nets[1].state_dict()
    torch.manual_seed(0)
    init = build_model("demo", num_classes=5).double().state_dict()
    assert one.keys() == two.keys()
    for k in one:
        change = (one[k] - init[k]).abs().max().item()
        assert change > 0, k  # the step moved every layer
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-9 * max(change, 1e-3))


@pytest.mark.slow
def test_train_model_parallel_2_on_cpu_equals_the_one_device_run(
    one_process_run, tiny_store, tmp_path, capsys
):
    """`alexnet train --model-parallel 2` end to end (on the CPU both towers share it) against
    the one-device run: the same 8 steps, the same weights to float summation order."""
    out = tmp_path / "mp"
    args = ["train", "--data", str(tiny_store), "--out", str(out), *DDP_ARGS]
    assert cli_main([*args, "--model-parallel", "2", "--device", "cpu"]) == 0
    import json

    derived = json.loads((out / "config.json").read_text())["derived"]
    assert derived["model_devices"] == ["cpu", "cpu"]
    assert_same_weights(one_process_run, out)
    # The optimiser state is laid out per tower: the run resumes only with the same split.
    assert cli_main(["train", "--resume", str(out), "--model-parallel", "1"]) == 2
    assert "trained with --model-parallel 2" in capsys.readouterr().err


def test_model_parallel_errors_are_clear(tiny_store, tmp_path, capsys):
    from alexnet.devices import model_devices

    with pytest.raises(ValueError, match="must be 1 or 2"):
        model_devices("cpu", 3)
    assert model_devices("cpu", 2) == [torch.device("cpu")] * 2
    # The torchvision layout has no towers to split.
    assert cli_main(["train", "--data", str(tiny_store), "--out", str(tmp_path / "tv"),
                     "--profile", "torchvision", "--model-parallel", "2", "--device", "cpu",
                     "--max-steps", "1", "--workers", "0"]) == 2  # fmt: skip
    print(capsys.readouterr().err)


# --- which devices a rank uses ------------------------------------------------------------------


def test_rank_devices_start_at_the_device_index():
    from alexnet.distributed import rank_devices

    cuda = torch.device
    assert rank_devices(cuda("cuda"), 0, 1, 8) == [cuda("cuda", 0)]
    assert rank_devices(cuda("cuda"), 3, 1, 8) == [cuda("cuda", 3)]
    assert rank_devices(cuda("cuda:1"), 0, 1, 2) == [cuda("cuda", 1)]  # --device cuda:1, 1 rank
    assert rank_devices(cuda("cuda:2"), 1, 2, 8) == [cuda("cuda", 4), cuda("cuda", 5)]
    with pytest.raises(ValueError, match="needs cuda:2..cuda:2; this node has 2 GPUs"):
        rank_devices(cuda("cuda:1"), 1, 1, 2)


def test_torchrun_with_a_device_this_machine_lacks_is_an_error(monkeypatch):
    """Under torchrun a CUDA device that is not there, or a device DDP cannot use, stops the
    run with a clear message before any process group is made (it used to fall back to gloo
    on the CPU without a word)."""
    from alexnet import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: 1 / 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            with distributed.context("cuda:1"):
                pass
    with pytest.raises(ValueError, match="runs on cuda or cpu"):
        with distributed.context("meta"):
            pass


def test_cudnn_benchmark_is_set_for_cuda_training_only():
    from alexnet.devices import select_device
    from alexnet.speed import configure_backends

    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends("cpu")
        select_device(torch.device("cpu"))  # a no-op off CUDA
        assert torch.backends.cudnn.benchmark is False  # the CPU path stays as it was
        configure_backends("cuda")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_select_device_gives_set_device_an_index(monkeypatch):
    """torch.cuda.set_device refuses an index-less torch.device("cuda") (what --device cuda and
    auto resolve to): select_device passes the current device's index for it (patched here, no
    GPU needed), the given index otherwise, and leaves CPUs alone."""
    from alexnet.devices import select_device

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", seen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    select_device(torch.device("cuda"))
    select_device(torch.device("cuda:1"))
    select_device(torch.device("cpu"))
    assert seen == [3, 1]


# --- issue 11, item 12: the ranks never drift apart -------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_item12_every_rank_resumes_rank_0s_checkpoint_not_its_own_copy(
    one_process_run, tiny_store, tmp_path
):
    """Two hosts without a shared filesystem, as two torchrun nodes with their own working
    folder: each has a run folder `run`, rank 0's at step 5, rank 1's an older copy at step 2.
    Rank 0 reads its checkpoint and sends it: the job ends as the one-process run."""
    a, b = tmp_path / "host0", tmp_path / "host1"
    base = ["train", "--data", str(tiny_store), "--out", str(a / "run"), *DDP_ARGS]
    assert cli_main([*base, "--max-steps", "2"]) == 0
    shutil.copytree(a / "run", b / "run")  # rank 1's folder: a stale copy
    assert cli_main(["train", "--resume", str(a / "run"), "--max-steps", "5"]) == 0
    port, procs = free_port(), []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for node, cwd in enumerate((a, b)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "alexnet", "train", "--resume", "run"]  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=400)
    finally:
        for p in procs:
            p.kill()
    logs = [(tmp_path / f"node{k}.log").read_text() for k in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert checkpoint.load_state(a / "run" / "state.pt")["position"]["step"] == 8
    assert_same_weights(one_process_run, a / "run")


def lock_is_free(folder: Path) -> bool:
    """Whether no process holds the folder's lock (fileio.exclusive_lock) now."""
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun launcher started."""
    out = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != launcher:  # the parent's pid
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


@pytest.mark.slow
def test_item12_ctrl_c_reaching_one_rank_stops_every_rank_at_the_same_step(
    one_process_run, tiny_store, tmp_path
):
    out = tmp_path / "ddp-int"
    proc = torchrun(2, ["--data", str(tiny_store), "--out", str(out), *DDP_ARGS])
    t0 = time.time()
    while steps_logged(out) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < 400, "timed out"
        time.sleep(0.05)
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGINT)  # rank 1 alone (a signal sent to one process)
    text, _ = proc.communicate(timeout=300)
    assert "interrupted; checkpoint saved" in text, text  # rank 0 saw it too, and saved
    step = checkpoint.load_state(out / "state.pt")["position"]["step"]
    assert 2 <= step < 8
    assert cli_main(["train", "--resume", str(out)]) == 0
    assert_same_weights(one_process_run, out)


_NAN_ON_RANK_1 = """
import os, sys
import alexnet.train as train
from alexnet.commands import main
real_init = train.Trainer.__init__
def init(self, *a, **kw):
    real_init(self, *a, **kw)
    if self.rank == 1:  # rank 1's half of the batch gives a NaN loss at step 3; rank 0's not
        calls = [0]
        def poison(module, inputs, output):
            calls[0] += 1
            return output * float("nan") if calls[0] == 3 else output
        self.model.fc8.register_forward_hook(poison)
train.Trainer.__init__ = init
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_item12_a_non_finite_loss_on_one_rank_stops_every_rank(tiny_store, tmp_path):
    out = tmp_path / "ddp-nan"
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(_NAN_ON_RANK_1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), "train", "--data", str(tiny_store), "--out", str(out), *DDP_ARGS,
           "--checkpoint-every", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # Rank 0, whose own loss was finite, stopped at the same step, saying why.
    assert "alexnet train: the loss became non-finite on another rank at step 3" in text, text
    state = checkpoint.load_state(out / "state.pt")
    assert state["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
