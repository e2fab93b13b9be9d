"""ReLU -> LRN -> max-pool (Sec. 3.1, 3.3, 3.4: the paper's order after conv1 and conv2) as one
CPU kernel, forward and backward, with exactly the unfused layers' function.

Why: the three layers are memory-bound, and apart they read and write the layer's whole maps
many times a step (55x55x96 per image after conv1). The kernel (csrc/lrn_pool.cpp) reads the
conv output once and writes only the pooled maps and each window's winner (one byte); its
backward reads the conv output, the pooled gradient and the winners once and writes the input
gradient once. The measured effect is in BENCHMARKS.md ("Why the code is shaped so").

The kernel is plain C++ compiled once per machine at first use (g++ -O3 -march=native -fopenmp,
about 2 s; the library is cached under ~/.cache/alexnet) and called through ctypes; torch's own
OpenMP runtime runs its threads. Where it does not apply (no C++ compiler, CUDA tensors, float16,
maps not in channels_last, a pool with padding or ceil_mode, inside torch.compile) the caller
runs the layers one by one (alexnet.lrn.local_response_norm). `ALEXNET_LRN_POOL=off` or
`set_enabled(False)` turns it off.

The formula (tested against a float64 loop in tests/test_lrn_pool.py): with a = relu(x),
    D = k + alpha * sum_{j in win(i)} a[j]^2,   b = a * D^-beta,   y = maxpool(b)
where win(i) is the `size` maps centred on i within i's group (tower); the backward routes the
pooled gradient to each window's winner (ties: the first in row-major order, as torch) and
applies the closed-form LRN gradient of alexnet.lrn.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from alexnet.buffers import kept
from alexnet.fileio import file_sha256, write_text

SOURCE = Path(__file__).with_name("csrc") / "lrn_pool.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _from_environment() -> bool:
    value = os.environ.get("ALEXNET_LRN_POOL", "on").strip().lower()
    if value in ("off", "0", "no", "false"):
        return False
    if value not in ("on", "1", "yes", "true", ""):
        warnings.warn(
            f"ALEXNET_LRN_POOL={value!r} is not one of on/off (1/0, yes/no): using the fused "
            "kernel (on)",
            stacklevel=2,
        )
    return True


_state: dict = {
    "enabled": _from_environment(),
    "lib": None,  # the loaded library
    "error": None,  # why it could not be built (then never tried again)
}
_lock = threading.Lock()


def set_enabled(on: bool) -> None:
    """Use the fused kernel where it applies (default), or never."""
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alexnet" / "kernels"


def _cpu_id() -> str:
    # -march=native: a library built for one CPU may not run on another (a shared home folder).
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256(source + " ".join(FLAGS + [version, _cpu_id()]).encode()).hexdigest()
    out = _cache_dir() / f"lrn_pool-{key[:16]}.so"
    # The library's checksum beside it: a damaged file (loading it can kill the process with
    # SIGBUS) is built again, not loaded.
    stamp = out.with_suffix(".sha256")
    if out.exists() and stamp.exists() and stamp.read_text().strip() == file_sha256(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name, then renamed: processes starting together never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run(
            [compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True
        )
        if r.returncode:
            raise RuntimeError(f"{compiler} failed: {r.stderr.strip()[-2000:]}")
        digest = file_sha256(tmp)
        os.replace(tmp, out)
        write_text(stamp, digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _library():
    """The compiled kernel, built on first use; None (and one warning) if it cannot be."""
    if _state["lib"] is not None or _state["error"] is not None:
        return _state["lib"]
    with _lock:
        if _state["lib"] is None and _state["error"] is None:
            try:
                compiler = os.environ.get("CXX", "g++")
                if shutil.which(compiler) is None:
                    raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
                lib = ctypes.CDLL(str(_build(compiler)))
                for fn in (lib.alexnet_lrn_pool_forward, lib.alexnet_lrn_pool_backward):
                    fn.restype = ctypes.c_int
                _state["lib"] = lib
            except Exception as e:  # the unfused layers compute the same function
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"fused ReLU-LRN-pool kernel unavailable ({_state['error']}); "
                    "running the layers one by one",
                    stacklevel=3,
                )
    return _state["lib"]


def _pool_geometry(pool) -> tuple[int, int] | None:
    """(kernel, stride) of a square max-pool without padding, dilation or ceil_mode."""

    def square(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v[0] if len(v) == 2 and v[0] == v[1] else None

    z, s = square(pool.kernel_size), square(pool.stride or pool.kernel_size)
    if z is None or s is None or square(pool.padding) != 0 or square(pool.dilation) != 1:
        return None
    if pool.ceil_mode or pool.return_indices or not (0 < z * z <= 255) or s < 1:
        return None
    return z, s


def applies(x: torch.Tensor, pool, groups: int) -> bool:
    """Whether lrn_max_pool can compute pool(LRN(x)) here (else run the layers one by one)."""
    return (
        _state["enabled"]
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.dim() == 4
        and x.shape[1] % groups == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
        and (geometry := _pool_geometry(pool)) is not None
        and min(x.shape[2:]) >= geometry[0]
        and _library() is not None
    )


def _geometry(x: torch.Tensor, consts) -> tuple:
    size, groups, _k, _alpha, _beta, _relu, z, s = consts
    n, c, h, w = x.shape
    ho, wo = (h - z) // s + 1, (w - z) // s + 1
    return n, c, h, w, ho, wo, (ctypes.c_int64 * 10)(n, h, w, c, groups, size, z, s, ho, wo)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class _LRNMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, groups, k, alpha, beta, relu, z, s):
        c = ctx.consts = (size, groups, k, alpha, beta, relu, z, s)
        n, ch, _h, _w, ho, wo, shape = _geometry(x, c)
        cl = torch.channels_last
        y = kept.empty("lrn_pool.y", (n, ch, ho, wo), x.dtype, x.device, cl)
        grad = ctx.needs_input_grad[0]  # else no backward will follow: no winners to keep
        win = kept.empty("lrn_pool.win", (n, ho, wo, ch), torch.uint8, x.device) if grad else None
        consts = (ctypes.c_double * 3)(k, alpha, beta)
        err = _library().alexnet_lrn_pool_forward(
            _DTYPES[x.dtype], _ptr(x), _ptr(y), _ptr(win) if grad else None, shape, consts,
            int(relu), torch.get_num_threads(),
        )  # fmt: skip
        if err:
            raise RuntimeError(f"lrn_pool forward failed ({err})")
        ctx.save_for_backward(x, win)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, win = ctx.saved_tensors
        size, groups, k, alpha, beta, relu, z, s = ctx.consts
        gy = gy.contiguous(memory_format=torch.channels_last)
        if gy.dtype != x.dtype:
            gy = gy.to(x.dtype)
        *_, shape = _geometry(x, ctx.consts)
        gx = kept.empty("lrn_pool.gx", tuple(x.shape), x.dtype, x.device, torch.channels_last)
        consts = (ctypes.c_double * 3)(k, alpha, beta)
        err = _library().alexnet_lrn_pool_backward(
            _DTYPES[x.dtype], _ptr(x), _ptr(gy), _ptr(win), _ptr(gx), shape, consts, int(relu),
            torch.get_num_threads(),
        )  # fmt: skip
        if err:
            raise RuntimeError(f"lrn_pool backward failed ({err})")
        return gx, None, None, None, None, None, None, None, None


def lrn_max_pool(x, size, alpha, beta, k, groups, relu, pool) -> torch.Tensor:
    """pool(LRN(relu(x) if relu else x)) in one pass; call only where applies(x, pool, groups)."""
    z, s = _pool_geometry(pool)
    return _LRNMaxPool.apply(
        x, int(size), int(groups), float(k), float(alpha), float(beta), bool(relu), z, s
    )
