"""The GPU path's numerics, checked on a CUDA GPU (skipped without one).

- the compiled LRN (bfloat16, channels_last, ReLU fused; the kernels a training run compiles)
  against a float64 NumPy loop of Sec. 3.3's formula, and its gradient against float64 autograd
  of a naive expression, at conv1's real size;
- one training step of the `paper` net on CUDA (float32, and bfloat16 + channels_last as the
  trainer runs it) against the same step in float64 on the CPU;
- the two-device code path on one GPU (devices=["cuda:0", "cuda:0"]) against the one-device
  form: forward, gradients and one PaperSGD step;
- nvJPEG decoding (the loader's decode="gpu") against libjpeg-turbo, and the loader's GPU path
  (parameters pinned and copied without waiting) against its CPU path;
- `alexnet train` end to end on CUDA: cudnn.benchmark, the run's own device, persistent loader
  workers, validation.

The lent GPU machine has no pytest: `python3 tests/test_cuda.py [--device cuda] [--json FILE]`
runs the same functions with a small runner (bench/gpu.sh step 1); `--device cpu` runs them on
the CPU (gpu.sh --dry-run, in CI), where they are weaker but keep this file from rotting.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet import lrn
from alexnet.config import DataConfig, get_profile
from alexnet.data import make_train_loader, open_store, prepare_store
from alexnet.data.loader import decode_batch, gpu_decode_available
from alexnet.model import build_model
from alexnet.optim import make_optimizer
from alexnet.speed import FastMode, autocast, prepare_input, prepare_model

try:
    import pytest

    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
except ImportError:  # the GPU machine: the runner at the bottom
    pytest = None

DEVICE = torch.device(os.environ.get("ALEXNET_CHECK_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"


@contextlib.contextmanager
def exact_float32():
    """Float32 convolutions and matmuls without TF32 (cuDNN's default for convolutions): the
    equivalence checks then compare float32 with float32, not with 10-bit mantissas."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float64 (norms over the whole tensor)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- the LRN --------------------------------------------------------------------------------


def lrn_formula(a: np.ndarray, k, alpha, n, beta, groups) -> np.ndarray:
    """Sec. 3.3 in float64: b_i = a_i / (k + alpha sum_{j in window(i), same tower} a_j^2)^beta."""
    a = a.astype(np.float64)
    sq = a * a
    c = a.shape[1]
    per = c // groups
    b = np.empty_like(a)
    for i in range(c):
        first = (i // per) * per
        lo, hi = max(first, i - n // 2), min(first + per - 1, i + n // 2)
        b[:, i] = a[:, i] / (k + alpha * sq[:, lo : hi + 1].sum(1)) ** beta
    return b


def lrn_naive(x: torch.Tensor, k, alpha, n, beta, groups) -> torch.Tensor:
    c = x.shape[1]
    per = c // groups
    out = []
    for i in range(c):
        first = (i // per) * per
        lo, hi = max(first, i - n // 2), min(first + per - 1, i + n // 2)
        out.append(x[:, i] / (k + alpha * (x[:, lo : hi + 1] ** 2).sum(1)) ** beta)
    return torch.stack(out, 1)


def test_compiled_lrn_bf16_channels_last_relu_matches_the_formula():
    """The kernels a paper run compiles for norm1 (96 maps, 55x55, two towers), bf16 and
    channels_last with the ReLU fused, and float32 NCHW: forward against the float64 formula,
    gradient against float64 autograd."""
    k, alpha, n, beta = 2.0, 1e-4, 5, 0.75  # the paper's constants
    shape = (16, 96, 55, 55) if ON_GPU else (2, 96, 13, 13)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 40  # the LRN acts at this scale
    grad_out = torch.randn(shape, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    ref = lrn_naive(xr.relu(), k, alpha, n, beta, 2)
    ref.backward(grad_out)
    np.testing.assert_allclose(
        ref.detach().numpy(), lrn_formula(np.maximum(x.numpy(), 0), k, alpha, n, beta, 2)
    )
    before = lrn.get_backend()
    lrn.set_backend("compiled")
    try:
        cases = ((torch.bfloat16, torch.channels_last, 2e-2), (torch.float32, None, 1e-5))
        for dtype, fmt, tol in cases:
            fmt = fmt or torch.contiguous_format
            xc = x.to(DEVICE, dtype).contiguous(memory_format=fmt).requires_grad_(True)
            out = lrn.fast_local_response_norm(xc, n, alpha, beta, k, groups=2, relu=True)
            out.backward(grad_out.to(DEVICE, dtype).contiguous(memory_format=fmt))
            assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
            err, gerr = rel(out, ref), rel(xc.grad, xr.grad)
            print(f"  LRN {dtype} {fmt}: forward {err:.1e}, gradient {gerr:.1e} (limit {tol:g})")
            assert err < tol and gerr < tol, (dtype, err, gerr)
    finally:
        lrn.set_backend(before)


# --- one training step -----------------------------------------------------------------------


def _one_step(devices, mode: FastMode, dtype=torch.float32, seed=0, batch=2):
    """One PaperSGD step of the paper net (dropout off: the masks come from different
    generators on different devices), as the trainer runs it: inputs in the mode's memory
    format, autocast, the loss in float32. Returns (loss, initial and final state). Batch 2
    keeps the LRN eager (below lrn.COMPILE_MIN_NUMEL): its compiled kernels, for the same
    dtypes and layouts, are the first check's, and cold compiles would cost this one a minute."""
    torch.manual_seed(seed)
    net = build_model("paper", num_classes=10, devices=devices, dropout=0.0)
    net = prepare_model(net.to(dtype), mode)
    init = {k: v.detach().clone().cpu().double() for k, v in net.state_dict().items()}
    opt = make_optimizer(net, get_profile("paper").train)
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(batch, 3, 224, 224, generator=g, dtype=torch.float64) * 255 - 120).to(dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    x, y = x.to(devices[0]), y.to(devices[0])
    with autocast(mode, devices[0]):
        out = net(prepare_input(x, mode))
    loss = F.cross_entropy(out.float() if dtype != torch.float64 else out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    final = {k: v.detach().cpu().double() for k, v in net.state_dict().items()}
    return loss.item(), init, final


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def test_a_training_step_on_cuda_matches_the_cpu_float64_step():
    """Every layer's change in one step against float64's. float32 (no TF32): within 1e-3 of
    the change, plus the float32 rounding of the weights themselves (a bias of 1 moved by 1e-4
    keeps 3 digits of its change). bfloat16 autocast + channels_last (the trainer's GPU mode):
    bf16's own error grows along the backward pass (conv1's change is ~35% off in bf16 on a
    CPU too, measured: cosine 0.92), so the direction is checked: cosine > 0.8 for every layer and
    the size within 60%. A wrong kernel, layout or tower gives cosines near 0."""
    loss64, init, ref = _one_step([torch.device("cpu")], FastMode(), torch.float64)
    for mode in (FastMode(), FastMode(channels_last=True, autocast_dtype="bfloat16")):
        with exact_float32():
            loss, init2, got = _one_step([DEVICE], mode)
        bf16 = mode.autocast_dtype is not None
        assert abs(loss - loss64) < (1e-2 if bf16 else 1e-5) * abs(loss64), (mode.label, loss)
        worst = []
        for name in ref:
            assert torch.equal(init2[name].float(), init[name].float()), name  # same start
            change, moved = ref[name] - init[name], got[name] - init2[name]
            if change.norm() == 0:  # a layer the step leaves alone in float64: so must we
                assert moved.norm() == 0, name
                continue
            if bf16:
                c, e = cosine(moved, change), rel(moved, change)
                worst.append((c, name))
                assert c > 0.8 and e < 0.6, (mode.label, name, c, e)
            else:
                floor = 4 * 2.0**-24 * float(init[name].norm())
                err = float((moved - change).norm())
                worst.append((err / float(change.norm()), name))
                assert err <= 1e-3 * float(change.norm()) + floor, (name, err, floor)
        what = min(worst) if bf16 else max(worst)
        print(f"  {mode.label}: loss {loss:.6f} (float64 {loss64:.6f}); worst layer "
              f"{what[1]}: {'cosine' if bf16 else 'relative error'} {what[0]:.3g}")  # fmt: skip


def test_two_devices_on_one_gpu_equal_the_one_device_form():
    """devices=[d, d]: every layer split into its towers' halves (two parameters each), the
    activations handed over where the towers communicate, on one GPU."""
    with exact_float32():
        l1, i1, w1 = _one_step([DEVICE], FastMode(), seed=3)
        l2, i2, w2 = _one_step([DEVICE, DEVICE], FastMode(), seed=3)
    assert abs(l1 - l2) <= 1e-5 * abs(l1)
    for name in w1:  # the same change, to float32 summation order and the weights' rounding
        assert torch.equal(i1[name], i2[name]), name
        change = (w1[name] - i1[name]).abs().max().item()
        diff = (w2[name] - w1[name]).abs().max().item()
        ulp = 2.0**-23 * i1[name].abs().max().item()
        assert diff <= 1e-3 * change + 2 * ulp, (name, diff, change)
    # with dropout: one mask for the whole layer drawn on the first device in both forms
    x = torch.randn(3, 3, 224, 224, device=DEVICE) * 50
    outs = []
    for devices in ([DEVICE], [DEVICE, DEVICE]):
        torch.manual_seed(5)
        net = build_model("paper", num_classes=10, devices=devices)
        torch.manual_seed(6)
        with exact_float32():
            outs.append(net(x))
    assert rel(outs[1], outs[0]) < 1e-5


# --- the loader on the GPU -------------------------------------------------------------------


def _tree(root: Path, n: int = 24) -> Path:
    """An ImageFolder tree of smooth coloured pictures (JPEG's home ground)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:340]
    for c in range(3):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(n // 3):
            cy, cx = rng.integers(60, 240, 2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 40.0**2))[..., None]
            img = 40 + 20 * np.sin(xx / 23.0 + c)[..., None] + blob * [180, 90 + 40 * c, 50 * c]
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"k{c}" / f"{i}.jpg")
    return root


def _idx(root: Path, n: int = 16) -> Path:
    """Fashion-MNIST's IDX format (a grey store, as the GPU machine's evidence runs use)."""
    import gzip
    import struct

    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:28, 0:28]
    for split, m in (("train", n), ("t10k", n // 2)):
        pics = np.stack([(255 * np.exp(-((yy - 14) ** 2 + (xx - 8 - i % 12) ** 2) / 30.0))
                         for i in range(m)]).astype(np.uint8)  # fmt: skip
        for kind, arr in (("images-idx3", pics), ("labels-idx1", rng.integers(0, 10, m))):
            head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim,
                                                                      *arr.shape)  # fmt: skip
            with gzip.open(root / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(head + arr.astype(np.uint8).tobytes())
    return root


def test_gpu_decoding_and_the_loaders_gpu_path():
    """nvJPEG against libjpeg-turbo on the records of an RGB and a grey store (different IDCTs
    and chroma upsampling: about a level apart), and the loader's two GPU paths against its
    CPU path."""
    if ON_GPU:
        assert gpu_decode_available(), "torchvision has no nvJPEG decoder here"
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(workers=1, progress=False, log=lambda *a: None)
        rgb = prepare_store(_tree(Path(tmp) / "src"), Path(tmp) / "rgb", kind="folder",
                            val_fraction=0.25, **quiet)  # fmt: skip
        grey = prepare_store(_idx(Path(tmp) / "idx"), Path(tmp) / "grey", **quiet)
        assert (rgb.channels, grey.channels) == (3, 1)
        for store in (open_store(rgb.path), open_store(grey.path)):
            bufs = store.records("train", np.arange(8))
            lengths = torch.tensor([len(b) for b in bufs])
            blob = torch.frombuffer(bytearray(b"".join(bufs)), dtype=torch.uint8)
            cpu = decode_batch(blob, lengths, store, "cpu").float()
            got = decode_batch(blob, lengths, store, DEVICE).float().cpu()
            assert got.shape == cpu.shape == (8, store.channels, 256, 256)
            d = (got - cpu).abs()
            print(f"  nvJPEG vs libjpeg-turbo, {store.channels} channel(s): mean "
                  f"{d.mean():.2f}, max {d.max():.0f} levels")  # fmt: skip
            assert d.mean() < 1.5, d.mean()
            data = DataConfig()
            ref = list(make_train_loader(store, data, 4, seed=1, epoch=0, workers=0))
            for decode in ("cpu", "gpu"):
                loader = make_train_loader(store, data, 4, seed=1, epoch=0, workers=2,
                                           device=DEVICE, decode=decode)  # fmt: skip
                got = [(x.cpu(), y.cpu()) for x, y in loader]
                loader.close()
                assert len(got) == len(ref) > 0
                for (x, y), (xr, yr) in zip(got, ref, strict=True):
                    assert torch.equal(y, yr)
                    err = (x - xr).abs()
                    if decode == "cpu":  # the same pixels; float32 arithmetic on the GPU
                        assert err.max() < 1e-3, err.max()
                    else:  # the decoders' difference, no more
                        assert err.mean() < 1.5, err.mean()


# --- a training run ---------------------------------------------------------------------------


def test_alexnet_train_runs_on_the_device():
    """`alexnet train` on the device, 2 epochs of 3 steps, validated after each: cudnn.benchmark
    on, the run's device current, bf16 + channels_last, finite losses (the LRN eager here: its
    compiled kernels are the first check's business, and compiling costs this check's time)."""
    from alexnet.commands import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        prepare_store(_tree(Path(tmp) / "src", n=36), store, kind="folder", val_fraction=0.25,
                      workers=1, progress=False, log=lambda *a: None)  # fmt: skip
        out = Path(tmp) / "run"
        before = torch.backends.cudnn.benchmark, lrn.get_backend()
        lrn.set_backend("eager")
        try:
            code = cli(["train", "--data", str(store), "--out", str(out), "--profile", "paper",
                        "--epochs", "2", "--batch-size", "8", "--workers", "2", "--log-every",
                        "1", "--device", str(DEVICE), "--set", "train.lr=0.001"])  # fmt: skip
            assert code == 0
            if ON_GPU:
                assert torch.backends.cudnn.benchmark is True
                assert torch.cuda.current_device() == (DEVICE.index or 0)
        finally:
            torch.backends.cudnn.benchmark = before[0]
            lrn.set_backend(before[1])
        cfg = json.loads((out / "config.json").read_text())["derived"]
        assert cfg["device"].startswith(DEVICE.type)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in recs if r["kind"] == "epoch"]
        steps = [r for r in recs if r["kind"] == "step"]
        assert len(epochs) == 2 and len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)
        print(f"  train on {cfg['device']}: mode {cfg['fast_mode']}, decode {cfg['decode']}, "
              f"val top-1 error {epochs[-1]['val_top1_error']:.2f}")  # fmt: skip


# --- the runner (no pytest needed) -------------------------------------------------------------


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    ap.add_argument("--json", metavar="FILE", help="write {check: {ok, seconds, error}} here")
    ap.add_argument("-k", default="", help="only the checks whose name contains this")
    args = ap.parse_args(argv)
    global DEVICE, ON_GPU
    DEVICE, ON_GPU = torch.device(args.device), torch.device(args.device).type == "cuda"
    if ON_GPU and not torch.cuda.is_available():
        print("no CUDA GPU here", file=sys.stderr)
        return 2
    results, failed = {}, 0
    for name, fn in list(globals().items()):
        if not name.startswith("test_") or args.k not in name:
            continue
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        try:
            fn()
            ok, error = True, None
        except Exception as e:  # every check runs; each failure is reported
            ok, error = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
            failed += 1
        seconds = time.perf_counter() - t0
        results[name] = {"ok": ok, "seconds": round(seconds, 1), "error": error}
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s)", flush=True)
        if args.json:  # after every check: a run cut short still reports what it did
            Path(args.json).write_text(json.dumps({"device": str(DEVICE), "checks": results}))
    print(f"{len(results) - failed}/{len(results)} checks passed on {DEVICE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
