"""ReLU -> LRN -> max-pool (Sec. 3.1, 3.3, 3.4: the paper's order after conv1 and conv2) as one
PyTorch operator, `torch.ops.alexnet.lrn_max_pool`, with a fused CPU kernel forward and backward
and exactly the unfused layers' function.

Why: the three layers are memory-bound, and apart they read and write the layer's whole maps
many times a step (55x55x96 per image after conv1). The kernel (csrc/lrn_pool.cpp) reads the
conv output once and writes only the pooled maps and each window's winner (one byte); its
backward reads the conv output, the pooled gradient and the winners once and writes the input
gradient once. The measured effect is in BENCHMARKS.md ("Why the code is shaped so").

A real operator, registered with torch.library: its schema and its fake (shape-only)
implementation are defined here, so torch.compile(fullgraph=True), torch.export and
FakeTensorMode see one op and never touch memory; its autograd formula is registered with
torch.library.register_autograd; its CPU kernel is C++ (csrc/lrn_pool.cpp, wrapped by
TORCH_LIBRARY_IMPL in csrc/lrn_pool_op.cpp), compiled once per machine at first use against
torch's headers and loaded with torch.ops.load_library.

The build (about 5 s; measured in BENCHMARKS.md) is cached under $XDG_CACHE_HOME/alexnet/kernels
(or ~/.cache), keyed by the source, the flags, the compiler's version, torch's version and the
CPU. The folder is made 0700 and must belong to this user and be writable by nobody else, the
library too; with a sha256 beside it (a truncated library kills the process with SIGBUS when
loaded): anything else is rebuilt in a private folder, never loaded. A compiler that produced no
loadable library caches nothing. No compiler (CXX, or g++; CXX may hold arguments, e.g.
"ccache g++") means the plain layers, with one warning. `ALEXNET_LRN_POOL=off` turns it off.

The formula (tested against a float64 loop in tests/test_lrn_pool.py): with a = relu(x),
    D = k + alpha * sum_{j in win(i)} a[j]^2,   b = a * D^-beta,   y = maxpool(b)
where win(i) is the maps within size//2 of i in i's group (tower); the backward routes the
pooled gradient to each window's winner (ties: the first in row-major order, as torch) and
applies the closed-form LRN gradient of alexnet.lrn.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension
from torch import nn

from alexnet.fileio import file_sha256, write_text

CSRC = Path(__file__).with_name("csrc")
# The kernels and the operator wrapping them: two translation units (see lrn_pool.cpp's header).
SOURCES = (CSRC / "lrn_pool.cpp", CSRC / "lrn_pool_op.cpp")
HEADERS = (CSRC / "lrn_pool.h",)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c++20"]
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
MAX_SIZE = 9  # windows of up to 9 maps (size // 2 <= 4: the kernel's unrolled taps)

# --- the operator: schema, fake implementation and autograd (no compiled code needed) --------
_lib = torch.library.Library("alexnet", "DEF")  # noqa: TOR901 (kept alive: it owns the op)
_lib.define(
    "lrn_max_pool(Tensor x, int size, int groups, float k, float alpha, float beta, bool relu, "
    "int z, int s, bool winners) -> (Tensor, Tensor)"
)
_lib.define(
    "lrn_max_pool_backward(Tensor x, Tensor gy, Tensor winners, int size, int groups, float k, "
    "float alpha, float beta, bool relu, int z, int s) -> Tensor"
)


def _pooled(x: torch.Tensor, z: int, s: int) -> tuple[int, int]:
    return (x.shape[2] - z) // s + 1, (x.shape[3] - z) // s + 1


@torch.library.register_fake("alexnet::lrn_max_pool")
def _fake_forward(x, size, groups, k, alpha, beta, relu, z, s, winners):
    n, c = x.shape[:2]
    ho, wo = _pooled(x, z, s)
    y = x.new_empty((n, c, ho, wo)).contiguous(memory_format=torch.channels_last)
    return y, x.new_empty((n if winners else 0, ho, wo, c), dtype=torch.uint8)


@torch.library.register_fake("alexnet::lrn_max_pool_backward")
def _fake_backward(x, gy, winners, size, groups, k, alpha, beta, relu, z, s):
    return torch.empty_like(x, memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, *consts, _winners = inputs
    ctx.consts = consts
    ctx.save_for_backward(x, output[1])


def _backward(ctx, gy, _gwin):
    x, win = ctx.saved_tensors
    gx = torch.ops.alexnet.lrn_max_pool_backward(x, gy, win, *ctx.consts)
    return gx, *[None] * (len(ctx.consts) + 1)


torch.library.register_autograd("alexnet::lrn_max_pool", _backward, setup_context=_setup_context)


# --- the CPU kernel: built once per machine, loaded into torch's operator registry ----------
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
    "loaded": False,  # the CPU kernel is in torch's registry
    "error": None,  # why it could not be built (then never tried again)
    "build_seconds": None,  # how long this process's build took (None: loaded from the cache)
}
_lock = threading.Lock()


def set_enabled(on: bool) -> None:
    """Use the fused kernel where it applies (default), or never."""
    _state["enabled"] = bool(on)


def enabled() -> bool:
    return _state["enabled"]


def cache_dir() -> Path:
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


def _private(path: Path, folder: bool) -> bool:
    """path is ours alone: owned by this user, not writable by group or others, not a link."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    return kind and st.st_uid == uid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _private_folder(folder: Path) -> Path:
    """The cache folder, made 0700, if it and its parent are this user's alone; else a fresh
    private temporary folder (a folder another user can write may hold a planted library)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        pass
    if _private(folder, True) and _private(folder.parent, True):
        return folder
    warnings.warn(
        f"{folder} is not private to this user (owner or permissions): building the fused "
        "kernel in a temporary folder instead of loading anything from there",
        stacklevel=4,
    )
    return Path(tempfile.mkdtemp(prefix="alexnet-kernels-"))


def _compiler() -> list[str]:
    words = shlex.split(os.environ.get("CXX") or "g++")
    if not words or shutil.which(words[0]) is None:
        raise RuntimeError(f"no C++ compiler ({' '.join(words) or 'CXX is empty'}) on PATH")
    return words


def _link_flags() -> list[str]:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    abi = int(torch.compiled_with_cxx11_abi())
    return [*includes, *libs, "-lc10", "-ltorch_cpu", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _check_loads(path: Path) -> None:
    """Load the new library in a child process first: a broken one (made by a compiler that
    is not one, a crash in its initialisers) kills the child, not this process, and is not
    cached."""
    code = (
        "import sys, torch, alexnet.lrn_pool; torch.ops.load_library(sys.argv[1]); "
        "x = torch.ones(1, 2, 3, 3).contiguous(memory_format=torch.channels_last); "
        "y, _ = torch.ops.alexnet.lrn_max_pool(x, 1, 1, 1.0, 0.0, 1.0, False, 3, 1, False); "
        "assert y.shape == (1, 2, 1, 1) and float(y.sum()) == 2.0"
    )
    env = {**os.environ, "ALEXNET_LRN_POOL": "off"}
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, env=env)
    if r.returncode:
        tail = (r.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the compiled kernel does not load (exit {r.returncode}): {tail}")


def _build(compiler: list[str]) -> Path:
    source = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    flags = FLAGS + _link_flags()
    ident = " ".join([*flags, version, torch.__version__, _cpu_id(), *compiler]).encode()
    key = hashlib.sha256(source + ident).hexdigest()
    folder = _private_folder(cache_dir())
    out = folder / f"lrn_pool-{key[:16]}.so"
    # The library's checksum beside it: a damaged file (loading it can kill the process with
    # SIGBUS) is built again, not loaded. Both must be ours alone (see _private_folder).
    stamp = out.with_suffix(".sha256")
    if (
        _private(out, False)
        and _private(stamp, False)
        and stamp.read_text().strip() == file_sha256(out)
    ):
        return out
    # Built under a temporary name, checked, then renamed: processes starting together never
    # load a half-written library, and a library that does not load is never cached.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    start = time.perf_counter()
    try:
        r = subprocess.run(
            [*compiler, *map(str, SOURCES), *flags, "-o", tmp], capture_output=True, text=True
        )
        if r.returncode:
            raise RuntimeError(f"{' '.join(compiler)} failed: {r.stderr.strip()[-2000:]}")
        _check_loads(Path(tmp))
        os.chmod(tmp, 0o700)
        digest = file_sha256(tmp)
        os.replace(tmp, out)
        write_text(stamp, digest)
        os.chmod(stamp, 0o600)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _state["build_seconds"] = time.perf_counter() - start
    return out


def available() -> bool:
    """The CPU kernel is loaded (built on first use); False (and one warning) if it cannot be."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            try:
                torch.ops.load_library(str(_build(_compiler())))
                _state["loaded"] = True
            except Exception as e:  # the unfused layers compute the same function
                _state["error"] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"fused ReLU-LRN-pool kernel unavailable ({_state['error']}); "
                    "running the layers one by one",
                    stacklevel=3,
                )
    return _state["loaded"]


def pool_geometry(pool: nn.Module) -> tuple[int, int] | None:
    """(kernel, stride) of exactly an nn.MaxPool2d (not a subclass, which may have its own
    forward) that is square, without padding, dilation, ceil_mode or indices; else None."""
    if type(pool) is not nn.MaxPool2d:
        return None

    def square(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v[0] if len(v) == 2 and v[0] == v[1] else None

    z = square(pool.kernel_size)
    s = square(pool.stride if pool.stride is not None else pool.kernel_size)
    if z is None or s is None or square(pool.padding) != 0 or square(pool.dilation) != 1:
        return None
    if pool.ceil_mode or pool.return_indices or not (0 < z * z <= 255) or s < 1:
        return None
    return z, s


def supports(x: torch.Tensor, size: int, groups: int, z: int) -> bool:
    """Whether the operator takes this input (else the caller runs the layers one by one).
    Tensor properties only (no memory is read): the same answer for fake tensors."""
    return (
        _state["enabled"]
        and x.device.type == "cpu"
        and x.dtype in DTYPES
        and x.dim() == 4
        and x.shape[1] % groups == 0
        and 1 <= size <= MAX_SIZE
        and min(x.shape[2:]) >= z
        and available()
    )


def lrn_max_pool(x, size, alpha, beta, k, groups, relu, z, s) -> torch.Tensor:
    """pool(LRN(relu(x) if relu else x)) by the operator (x is made channels_last)."""
    x = x.contiguous(memory_format=torch.channels_last)
    winners = torch.is_grad_enabled() and x.requires_grad  # else no backward: no winners kept
    y, _ = torch.ops.alexnet.lrn_max_pool(
        x, int(size), int(groups), float(k), float(alpha), float(beta), bool(relu), z, s, winners
    )
    return y
