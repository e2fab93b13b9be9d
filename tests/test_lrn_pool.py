"""The fused ReLU -> LRN -> max-pool kernel (alexnet.lrn_pool) against independent references.

The reference is written here, independently of alexnet: relu, the LRN as a float64 sum over
shifted maps, and torch's own max_pool2d, differentiated by float64 autograd. The kernel must
give that function's output and gradient (to float32 or bfloat16 rounding), route the pooled
gradient to the same winner as torch on ties, and never hand a caller's tensor out twice.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet import buffers, lrn_pool
from alexnet.lrn import local_response_norm
from alexnet.model import build_model
from alexnet.towers import _autocast_weight

pytestmark = pytest.mark.skipif(
    lrn_pool._library() is None, reason=f"no fused kernel here: {lrn_pool._state['error']}"
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
    pool = nn.MaxPool2d(z, s)
    assert lrn_pool.applies(x, pool, groups)
    return lrn_pool.lrn_max_pool(x, size, alpha, beta, k, groups, relu, pool)


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


def test_local_response_norm_with_pool_equals_the_layers_one_by_one():
    x = inputs((2, 16, 15, 15), torch.float32)
    pool = nn.MaxPool2d(3, 2)
    lrn_pool.set_enabled(False)
    try:
        apart = local_response_norm(x, 5, 1e-3, 0.75, 2.0, 2, relu=True, pool=pool)
    finally:
        lrn_pool.set_enabled(True)
    together = local_response_norm(x, 5, 1e-3, 0.75, 2.0, 2, relu=True, pool=pool)
    assert torch.allclose(together, apart, rtol=1e-5, atol=1e-6)
    # Where the kernel does not apply (NCHW maps, a padded pool), the layers run one by one.
    assert not lrn_pool.applies(x.contiguous(), pool, 2)
    assert not lrn_pool.applies(x, nn.MaxPool2d(3, 2, padding=1), 2)
    assert not lrn_pool.applies(x, nn.MaxPool2d(3, 2, ceil_mode=True), 2)


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


def test_kept_tensors_are_reused_only_when_free():
    kept = buffers.KeptTensors()
    a = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    ptr = a.data_ptr()
    b = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    assert b.data_ptr() != ptr  # a is alive
    view = b[1:]
    del a, b
    c = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    assert c.data_ptr() != view.untyped_storage().data_ptr()  # the view holds b's storage
    del view
    saved = c * torch.ones(4, 4, requires_grad=True)  # autograd saves c for the backward
    ptr = c.data_ptr()
    del c
    d = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    assert d.data_ptr() != ptr
    del saved, d
    e = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    f = kept.empty("t", (4, 4), torch.float32, torch.device("cpu"))
    assert e.data_ptr() != f.data_ptr()
    del e, f
    assert kept.empty("t", (4, 4), torch.float32, torch.device("cpu")).data_ptr() in {
        t.data_ptr() for t, _ in kept.tensors.values()
    }


def test_the_paper_net_fused_and_unfused_compute_the_same_function():
    torch.manual_seed(0)
    model = build_model("paper", num_classes=10, dropout=0.0)
    x = torch.randn(2, 3, 224, 224)
    results = []
    for on in (True, False):
        lrn_pool.set_enabled(on)
        try:
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
        finally:
            lrn_pool.set_enabled(True)
        results.append((out.detach(), model.conv1.weight.grad.clone()))
    (o1, g1), (o2, g2) = results
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-6)
    assert ((g1 - g2).abs().max() / g2.abs().max()) < 1e-3


def test_autocast_weight_cast_is_autocasts_rounding_bit_for_bit():
    w = torch.randn(64, 96, requires_grad=True)
    x = torch.randn(8, 96)
    grads = []
    for kept_cast in (True, False):
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ww = _autocast_weight(w, "test") if kept_cast else w
            y = F.linear(x, ww)
        (y.float() * torch.arange(64.0)).sum().backward()
        grads.append((y.detach(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_without_a_compiler_the_layers_run_one_by_one(tmp_path):
    # A fresh process that cannot build the kernel: one warning, then the unfused layers.
    code = (
        "import warnings, torch\n"
        "from torch import nn\n"
        "from alexnet.lrn import local_response_norm\n"
        "x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = local_response_norm(x, 5, 1e-3, 0.75, 2.0, 2, True, nn.MaxPool2d(3, 2))\n"
        "print(y.shape, [str(m.message) for m in w if 'fused' in str(m.message)])\n"
    )
    env = dict(os.environ, CXX="no-such-compiler", XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2, 8, 4, 4])" in r.stdout
    assert "no C++ compiler (no-such-compiler)" in r.stdout


def test_a_damaged_cached_library_is_built_again(tmp_path):
    # Loading a truncated library would kill the process (SIGBUS): its checksum says rebuild.
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from alexnet import lrn_pool\n"
        "x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)\n"
        "assert lrn_pool.applies(x, nn.MaxPool2d(3, 2), 2), lrn_pool._state['error']\n"
        "print(lrn_pool.lrn_max_pool(x, 5, 1e-3, 0.75, 2.0, 2, True, nn.MaxPool2d(3, 2)).shape)\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))

    def run():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)

    first = run()
    assert first.returncode == 0, first.stderr
    (lib,) = (tmp_path / "alexnet" / "kernels").glob("*.so")
    size = lib.stat().st_size
    lib.write_bytes(lib.read_bytes()[:1000])
    second = run()
    assert second.returncode == 0, second.stderr
    assert "torch.Size([2, 8, 4, 4])" in second.stdout
    assert lib.stat().st_size == size
