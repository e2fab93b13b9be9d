"""The fused ReLU -> LRN -> max-pool operator (alexnet.lrn_pool) and the modules that use it
(alexnet.fast) against independent references.

The reference is written here, independently of alexnet: relu, the LRN as a float64 sum over
shifted maps, and torch's own max_pool2d, differentiated by float64 autograd. The operator must
give that function's output and gradient (to float32 or bfloat16 rounding; float64 exactly),
route the pooled gradient to the same winner as torch on ties, pass torch.library's own checks
(opcheck: schema, fake implementation, autograd), and fail only where the plain layers fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet import fast, lrn_pool
from alexnet.lrn import LocalResponseNorm
from alexnet.model import build_model

pytestmark = pytest.mark.skipif(
    not lrn_pool.available(), reason=f"no fused kernel here: {lrn_pool._state['error']}"
)


def reference(x64, size, alpha, beta, k, groups, relu, z, s):
    """max_pool2d(LRN(relu(x))) in float64: the window sum as shifted slices per group."""
    a = torch.relu(x64) if relu else x64
    n, c, h, w = a.shape
    cg, half = c // groups, size // 2
    sq = F.pad((a * a).reshape(n, groups, cg, h, w), (0, 0, 0, 0, half, half))
    window = sum(sq[:, :, o : o + cg] for o in range(size)).reshape(n, c, h, w)
    return F.max_pool2d(a / (k + alpha * window) ** beta, z, s)


def fused(x, size, alpha, beta, k, groups, relu, z, s):
    assert lrn_pool.supports(x, size, groups, z)
    return lrn_pool.lrn_max_pool(x, size, alpha, beta, k, groups, relu, z, s)


def inputs(shape, dtype, seed=0, scale=30.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


CASES = [
    # shape, size, alpha, beta, k, groups, relu, z, s
    ((3, 96, 27, 27), 5, 1e-4, 0.75, 2.0, 2, True, 3, 2),  # the paper's conv1 block, smaller
    ((2, 20, 13, 11), 5, 1e-3, 0.75, 2.0, 1, False, 3, 2),  # not square, one group, no relu
    ((2, 12, 9, 9), 3, 1e-2, 0.6, 1.0, 3, True, 2, 2),  # other window, beta, k; disjoint pools
    ((2, 6, 10, 10), 7, 1e-2, 0.75, 2.0, 2, True, 3, 3),  # window wider than a group (3 maps)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-n{c[1]}")
def test_forward_and_gradient_match_the_float64_reference(case, dtype):
    shape, *params = case
    x = inputs(shape, dtype).requires_grad_()
    y = fused(x, *params)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(g.to(dtype))

    x64 = x.detach().double().requires_grad_()
    y64 = reference(x64, *params)
    y64.backward(g)
    # bfloat16 rounds the output once (8 bits); float32 only its own rounding.
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert y.shape == y64.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.double(), y64, rtol=tol, atol=tol * y64.abs().max().item())
    err = (x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_ties_go_to_the_first_winner_as_in_torch():
    # Every value repeated over 2x2 blocks, and many zeros after the ReLU: each pooling window
    # holds ties, which torch breaks in favour of the first in row-major order.
    base = inputs((2, 8, 6, 6), torch.float64, seed=3)
    x = base.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :11, :11].float()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    params = (5, 1e-3, 0.75, 2.0, 2, True, 3, 2)
    y = fused(x, *params)
    g = torch.rand(y.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    reference(x64, *params).backward(g.double())
    # Same winners: the gradient is zero exactly where torch's is, and equal elsewhere.
    assert torch.equal(x.grad != 0, x64.grad != 0)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_nan_propagates_as_in_torch():
    x = inputs((1, 4, 7, 7), torch.float32).clone()
    x[0, 1, 3, 3] = float("nan")
    y = fused(x, 3, 1e-3, 0.75, 2.0, 1, True, 3, 2)
    expected = reference(x.double(), 3, 1e-3, 0.75, 2.0, 1, True, 3, 2)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.isnan(y).any()


def test_a_held_output_or_gradient_is_never_overwritten():
    params = (5, 1e-3, 0.75, 2.0, 2, True, 3, 2)
    x1 = inputs((2, 8, 9, 9), torch.float32, seed=5).requires_grad_()
    x2 = inputs((2, 8, 9, 9), torch.float32, seed=6).requires_grad_()
    y1 = fused(x1, *params)
    first = y1.detach().clone()
    y2 = fused(x2, *params)  # same shape: would reuse y1's storage if it were free
    assert torch.equal(y1, first) and not torch.equal(y1, y2)
    y1.sum().backward()
    g1 = x1.grad.clone()
    y2.sum().backward()
    assert torch.equal(x1.grad, g1)
    # retain_graph: the saved input and winners survive a second backward.
    x3 = inputs((2, 8, 9, 9), torch.float32, seed=7).requires_grad_()
    y3 = fused(x3, *params)
    y3.sum().backward(retain_graph=True)
    once = x3.grad.clone()
    y3.sum().backward()
    assert torch.allclose(x3.grad, 2 * once)


def test_float64_is_exact_and_gradcheck_passes():
    x = inputs((2, 8, 9, 9), torch.float64, seed=2).requires_grad_()
    params = (5, 1e-2, 0.75, 2.0, 2, True, 3, 2)
    y = fused(x, *params)
    torch.testing.assert_close(y, reference(x.detach(), *params), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(lambda t: fused(t, *params), (x,))


def test_torch_library_opcheck():
    """torch.library's own test of an operator: schema, fake (meta) implementation against the
    real kernel, autograd registration, and the dispatch through torch.compile's AOT path."""
    for dtype in (torch.float32, torch.float64):
        x = inputs((2, 6, 9, 9), dtype).requires_grad_()
        torch.library.opcheck(
            torch.ops.alexnet.lrn_max_pool, (x, 5, 2, 2.0, 1e-3, 0.75, True, 3, 2, True)
        )


def _block(size=5, pool=None, relu=True, groups=2):
    """(plain Sequential, its fused copy): ReLU -> LRN -> pool, the paper's conv1 tail."""
    norm = LocalResponseNorm(size, 1e-3, 0.75, 2.0, groups)
    stages = [nn.ReLU(inplace=True)] if relu else []
    plain = nn.Sequential(*stages, norm, pool if pool is not None else nn.MaxPool2d(3, 2))
    import copy

    return plain, fast.fuse(copy.deepcopy(plain))


def _same_function(plain, fused, x, rtol=1e-5):
    """Output and input gradient of the plain and the fused module agree (or both raise)."""
    results = []
    for m in (plain, fused):
        xi = x.detach().clone().requires_grad_()
        try:
            y = m(xi.clone())
        except Exception as e:  # noqa: BLE001 (the same error type from both)
            results.append(type(e))
            continue
        y.square().sum().backward()
        results.append((y.detach(), xi.grad))
    if isinstance(results[0], type) or isinstance(results[1], type):
        assert results[0] == results[1], results
        return
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y2, y1, rtol=rtol, atol=rtol * y1.abs().max().item())
    torch.testing.assert_close(g2, g1, rtol=rtol, atol=rtol * g1.abs().max().item())


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 15])
def test_every_lrn_size_fused_equals_plain(size):
    """Windows of up to 9 maps run in the operator, wider ones unfused: the same function
    (before, any size but 1, 3, 5, 7, 9 raised 'lrn_pool forward failed (2)')."""
    plain, fused = _block(size=size, groups=1)
    assert isinstance(fused[0], fast.LRNMaxPool)
    x = inputs((2, 16, 11, 11), torch.float64, seed=size)
    _same_function(plain, fused, x, rtol=1e-12)


class _TopTwoPool(nn.MaxPool2d):
    """A max-pool subclass with a forward of its own (the sum of the two largest values)."""

    def forward(self, x):
        u = F.unfold(x, self.kernel_size, stride=self.stride)
        u = u.unflatten(1, (x.shape[1], -1)).topk(2, dim=2).values.sum(2)
        h = (x.shape[2] - self.kernel_size) // self.stride + 1
        return u.unflatten(2, (h, -1))


@pytest.mark.parametrize(
    "pool",
    [
        _TopTwoPool(3, 2),
        nn.AvgPool2d(3, 2),
        nn.LPPool2d(2, 3, 2),
        nn.MaxPool2d(3, 2, padding=1),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.MaxPool2d((3, 2), 2),
        nn.MaxPool2d(3, 0),
    ],
    ids=["maxpool-subclass", "avgpool", "lppool", "padded", "ceil", "not-square", "stride-0"],
)
def test_a_replaced_pool_is_run_as_it_is(pool):
    """Fused only for exactly nn.MaxPool2d with a geometry the operator supports; any other
    pool runs as itself after the LRN (before, a MaxPool2d subclass was silently replaced by a
    plain max-pool, AvgPool2d/LPPool2d raised AttributeError, stride 0 pooled with stride 3)."""
    plain, fused = _block(pool=pool)
    x = inputs((2, 8, 11, 11), torch.float64, seed=9)
    _same_function(plain, fused, x, rtol=1e-12)


def test_fake_tensors_get_shapes_and_no_memory_is_touched():
    """Under FakeTensorMode (torch.export's and torch.compile's tracer, shape inference tools)
    the operator's fake implementation answers; the next real call is unaffected (before:
    SIGSEGV writing through a fake tensor's pointer)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # test only: how tools trace

    model = fast.fuse(build_model("paper", num_classes=10))
    x = torch.randn(2, 3, 224, 224)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        out = model(fx)
        out.sum().backward()
    assert out.shape == (2, 10)
    real = model(x)
    assert real.shape == (2, 10) and torch.isfinite(real).all()


def test_outputs_are_fresh_tensors_a_caller_may_keep_share_or_free():
    """Each call returns new storage: a kept output survives later steps, and freeing a
    returned tensor's storage (as FSDP-style and offloading code does) breaks nothing (before:
    a SIGSEGV on the next step, and a kept tensor sent to another process was overwritten)."""
    params = (5, 1e-3, 0.75, 2.0, 2, True, 3, 2)
    x = inputs((2, 8, 9, 9), torch.float32, seed=5).requires_grad_()
    y1 = fused(x, *params)
    first = y1.detach().clone()
    y1.detach().untyped_storage().resize_(0)
    y2 = fused(x, *params)
    torch.testing.assert_close(y2, first, rtol=0, atol=0)
    kept = fused(x.detach(), *params)
    for seed in range(3):
        fused(inputs((2, 8, 9, 9), torch.float32, seed=seed), *params)
    torch.testing.assert_close(kept, first, rtol=0, atol=0)


@pytest.mark.parametrize("profile", ["paper", "cuda-convnet", "caffe"])
def test_the_nets_fused_and_unfused_compute_the_same_function(profile):
    """In float64 (the operator computes float64 in float64) the fused and the plain network
    agree to rounding, output and every gradient; in float32 the outputs agree to float32
    rounding (the gradients of conv1, a sum over every position of both images, differ by up to
    a few percent in float32 from rounding in another order: float64 shows the function)."""
    import copy

    torch.manual_seed(0)
    plain = build_model(profile, num_classes=10, dropout=0.0)
    size = plain.config.input_size
    for dtype in (torch.float64, torch.float32):
        p = copy.deepcopy(plain).to(dtype)
        q = fast.fuse(copy.deepcopy(p))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)
        results = []
        for model in (q, p):
            out = model(x)
            out.square().sum().backward()
            results.append((out.detach(), [t.grad for t in model.parameters()]))
        (o1, g1), (o2, g2) = results
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(o1, o2, rtol=tol, atol=tol * o2.abs().max().item())
        if dtype == torch.float64:
            for a, b in zip(g1, g2, strict=True):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


# --- the build: a compiler, a cache folder, and what may be loaded from it ------------------
_PROBE = (
    "import warnings, torch\n"
    "from alexnet import lrn_pool\n"
    "x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "    warnings.simplefilter('always')\n"
    "    ok = lrn_pool.supports(x, 5, 2, 3)\n"
    "print('loaded' if ok else 'unfused', lrn_pool._state['build_seconds'])\n"
    "print([str(m.message) for m in w])\n"
)


def _probe(cache, **env):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), **env)
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache folder holding a library built by `env g++` (CXX with an argument)."""
    cache = tmp_path_factory.mktemp("xdg")
    out = _probe(cache, CXX="env g++")
    assert out.startswith("loaded"), out
    return cache


def _library(cache):
    (lib,) = (cache / "alexnet" / "kernels").glob("*.so")
    return lib


@pytest.mark.slow
def test_cxx_with_arguments_builds_and_the_cache_is_private(built_cache):
    """CXX='env g++' builds (before: CXX with arguments turned the kernel off); the folder and
    the files are this user's alone (0700 / 0600)."""
    folder = built_cache / "alexnet" / "kernels"
    assert (folder.stat().st_mode & 0o777) == 0o700
    lib = _library(built_cache)
    assert (lib.stat().st_mode & 0o077) == 0 and (
        lib.with_suffix(".sha256").stat().st_mode & 0o077
    ) == 0
    assert _probe(built_cache, CXX="env g++").startswith("loaded None")  # from the cache


@pytest.mark.slow
def test_a_damaged_cached_library_is_built_again(built_cache, tmp_path):
    """Loading a truncated library would kill the process (SIGBUS): its checksum says rebuild."""
    cache = tmp_path / "copy"
    shutil.copytree(built_cache, cache)
    lib = _library(cache)
    size = lib.stat().st_size
    lib.write_bytes(lib.read_bytes()[:1000])
    out = _probe(cache, CXX="env g++")
    assert out.startswith("loaded") and "None" not in out.splitlines()[0]  # built again
    assert lib.stat().st_size == size


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's file needs root")
def test_a_library_planted_by_another_user_is_never_loaded(built_cache, tmp_path):
    """Another local user's library under the expected name, with a matching checksum beside
    it, in our cache folder or in a folder they can write: never loaded (before: it ran inside
    the victim's process)."""
    cache = tmp_path / "copy"
    shutil.copytree(built_cache, cache)
    lib = _library(cache)
    marker = tmp_path / "planted-code-ran"
    evil = tmp_path / "evil.c"
    evil.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) {"
        f' FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n'
    )
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(evil)], check=True)
    stamp = lib.with_suffix(".sha256")
    stamp.write_text(subprocess.run(["sha256sum", str(lib)], capture_output=True, text=True,
                                    check=True).stdout.split()[0])  # fmt: skip
    nobody = 65534
    os.chown(lib, nobody, nobody)
    os.chown(stamp, nobody, nobody)
    out = _probe(cache, CXX="env g++")
    assert out.startswith("loaded") and not marker.exists()
    # The folder itself writable by others: nothing is loaded from it, one warning (the build
    # goes to a private temporary folder; `true` makes no library there, so: unfused).
    folder = lib.parent
    os.chmod(folder, 0o777)
    out = _probe(cache, CXX="true")
    assert out.startswith("unfused") and not marker.exists()
    assert "is not private to this user" in out


@pytest.mark.parametrize("cxx", ["no-such-compiler", "true", "junk"])
def test_a_compiler_that_makes_no_valid_library_caches_nothing(cxx, tmp_path):
    """No compiler, one that makes no file (true) or one that writes junk and exits 0: one
    warning, the layers run one by one, and nothing is cached (before: a broken library was
    cached beside a valid checksum)."""
    if cxx == "junk":
        script = tmp_path / "junk-cxx"
        script.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done; echo junk > "$2"\n')
        script.chmod(0o755)
        cxx = str(script)
    cache = tmp_path / "xdg"
    out = _probe(cache, CXX=cxx)
    assert out.startswith("unfused") and "fused ReLU-LRN-pool kernel unavailable" in out
    assert not list(cache.glob("alexnet/kernels/*"))
