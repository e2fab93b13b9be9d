"""The LRN (Sec. 3.3) and cuda-convnet's spatial normalisation against their printed formulas.

The references are written independently of alexnet.lrn: a float64 NumPy loop over the maps for
the forward pass, and autograd through a naive float64 torch expression (or
torch.autograd.gradcheck's finite differences) for the gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet import lrn
from alexnet.lrn import (
    LocalResponseNorm,
    SpatialResponseNorm,
    fast_local_response_norm,
    local_response_norm,
)

# (k, alpha, n, beta) of each profile (docs/facts.md): the paper as printed, the
# 2012 code (alpha = scale / size), Caffe (k = 1, alpha / local_size).
PROFILES = {
    "paper": (2.0, 1e-4, 5, 0.75),
    "cuda-convnet": (2.0, 1e-4 / 5, 5, 0.75),
    "caffe": (1.0, 1e-4 / 5, 5, 0.75),
}


def lrn_numpy(a: np.ndarray, k, alpha, n, beta, groups) -> np.ndarray:
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, per tower."""
    a = a.astype(np.float64)
    b = np.empty_like(a)
    channels = a.shape[1]
    per = channels // groups
    for i in range(channels):
        first = (i // per) * per  # the tower's first map: the window stays in the tower
        lo, hi = max(first, i - n // 2), min(first + per - 1, i + n // 2)
        s = np.zeros_like(a[:, i])
        for j in range(lo, hi + 1):
            s += a[:, j] ** 2
        b[:, i] = a[:, i] / (k + alpha * s) ** beta
    return b


def lrn_naive_torch(x: torch.Tensor, k, alpha, n, beta, groups) -> torch.Tensor:
    """The same formula as a plain differentiable expression (for autograd references)."""
    channels = x.shape[1]
    per = channels // groups
    out = []
    for i in range(channels):
        first = (i // per) * per
        lo, hi = max(first, i - n // 2), min(first + per - 1, i + n // 2)
        out.append(x[:, i] / (k + alpha * (x[:, lo : hi + 1] ** 2).sum(1)) ** beta)
    return torch.stack(out, 1)


@pytest.fixture
def backend():
    """Run a test under a chosen LRN backend and restore the previous one afterwards."""
    before = lrn.get_backend()
    yield lrn.set_backend
    lrn.set_backend(before)


@pytest.fixture(params=["plain", "fast-eager"])
def impl(request, backend):
    """The two forms of the formula: the plain ops (autograd differentiates them) and the fast
    form's eager backend (its hand-written backward)."""
    if request.param == "plain":
        return local_response_norm
    backend("eager")
    return fast_local_response_norm


def activations(shape=(2, 16, 5, 6), seed=0, scale=40.0, signed=False) -> torch.Tensor:
    # Large values so that alpha * sum a^2 is comparable to k: the normalisation really acts.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x if signed else x.relu()


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_formula(profile, groups, channels_last, impl):
    k, alpha, n, beta = PROFILES[profile]
    x = activations()
    ref = lrn_numpy(x.numpy(), k, alpha, n, beta, groups)
    xin = x.float()
    if channels_last:
        xin = xin.contiguous(memory_format=torch.channels_last)
    out = impl(xin, n, alpha, beta, k, groups)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=2e-6, atol=1e-6)
    # The normalisation is not a no-op at this scale (the test could fail).
    assert np.abs(ref - x.numpy()).max() > 0.05 * np.abs(x.numpy()).max()


def test_windows_stay_inside_each_tower(impl):
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(1, 8, 3, 3))
    both = impl(x, n, alpha, beta, k, groups=2)
    # Tower B's maps alone give the same result for tower B: tower A's maps never enter.
    alone = impl(x[:, 4:].contiguous(), n, alpha, beta, k, groups=1)
    torch.testing.assert_close(both[:, 4:], alone)
    # With one group, the maps at the tower boundary do see each other.
    one = impl(x, n, alpha, beta, k, groups=1)
    assert not torch.allclose(one[:, 3:5], both[:, 3:5])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_gradient_gradcheck(groups, channels_last, relu, impl):
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(1, 8, 3, 4), scale=30.0, signed=relu)
    if relu:
        x = x + 0.5 * torch.sign(x)  # keep clear of the kink at 0 for finite differences
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: impl(t, n, alpha, beta, k, groups, relu=relu), (x,))


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("relu", [False, True])
def test_gradient_matches_naive_autograd(profile, relu, impl):
    k, alpha, n, beta = PROFILES[profile]
    x = activations(shape=(2, 16, 4, 5), signed=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    impl(xa, n, alpha, beta, k, 2, relu=relu).backward(g)
    xr = x.clone().requires_grad_(True)
    lrn_naive_torch(xr.relu() if relu else xr, k, alpha, n, beta, 2).backward(g)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-10, atol=1e-12)


def test_relu_fused_equals_relu_first(impl):
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(signed=True)
    ref = lrn_numpy(np.maximum(x.numpy(), 0), k, alpha, n, beta, 2)
    out = impl(x, n, alpha, beta, k, 2, relu=True)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert (x < 0).any()  # the input really has negative values to rectify


@pytest.mark.parametrize("channels_last", [False, True])
def test_bfloat16_close_to_float32(channels_last, impl):
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(2, 16, 6, 6)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = lrn_numpy(x.double().numpy(), k, alpha, n, beta, 2)
    xb = x.bfloat16().requires_grad_(True)
    out = impl(xb, n, alpha, beta, k, 2)
    assert out.dtype == torch.bfloat16
    scale = np.abs(ref).max()
    assert np.abs(out.detach().double().numpy() - ref).max() < 2e-2 * scale  # bf16: 8 bits
    out.float().sum().backward()
    x32 = x.clone().requires_grad_(True)
    impl(x32, n, alpha, beta, k, 2).sum().backward()
    gscale = x32.grad.abs().max()
    assert (xb.grad.float() - x32.grad).abs().max() < 3e-2 * gscale


def test_module_and_errors():
    k, alpha, n, beta = PROFILES["caffe"]
    m = LocalResponseNorm(n, alpha, beta, k, groups=2)
    assert "groups=2" in repr(m)
    x = activations()
    np.testing.assert_allclose(
        m(x).numpy(), lrn_numpy(x.numpy(), k, alpha, n, beta, 2), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="groups"):
        local_response_norm(torch.zeros(1, 5, 2, 2), groups=2)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        local_response_norm(torch.zeros(5, 2, 2))
    with pytest.raises(ValueError, match="backend"):
        lrn.set_backend("fast")


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_kernels_match_formula(channels_last, backend):
    """The torch.compile'd kernels (the fast path of real batches) against the formula: forward
    vs NumPy, gradient vs autograd of the naive expression, fp32 and bf16, ReLU fused or not."""
    backend("compiled")
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(2, 16, 5, 6), signed=True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    ref = lrn_naive_torch(xr.relu(), k, alpha, n, beta, 2)
    ref.backward(g)
    np.testing.assert_allclose(
        ref.detach().numpy(), lrn_numpy(np.maximum(x.numpy(), 0), k, alpha, n, beta, 2)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        xc = x.to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
        out = fast_local_response_norm(xc, n, alpha, beta, k, 2, relu=True)
        out.backward(g.to(dtype).contiguous(memory_format=fmt))
        assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
        err = (out.double() - ref).abs().max() / ref.abs().max()
        gerr = (xc.grad.double() - xr.grad).abs().max() / xr.grad.abs().max()
        assert err < tol and gerr < tol, (dtype, err, gerr)


def spatial_numpy(a: np.ndarray, k, alpha, size, beta) -> np.ndarray:
    """b = a / (k + alpha * sum_{size x size window, zeros outside} a^2)^beta, map by map."""
    a = a.astype(np.float64)
    h, w = a.shape[2:]
    r = size // 2
    b = np.empty_like(a)
    for y in range(h):
        for x in range(w):
            win = a[:, :, max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
            s = (win**2).sum(axis=(2, 3))
            b[:, :, y, x] = a[:, :, y, x] / (k + alpha * s) ** beta
    return b


def test_spatial_response_norm_matches_formula():
    # layers-145's rnorm: size 5, scale 0.001 divided by 5^2, pow 0.75, constant 1 (the facts).
    size, alpha, beta, k = 5, 0.001 / 25, 0.75, 1.0
    x = activations(shape=(2, 3, 7, 6), scale=20.0)
    m = SpatialResponseNorm(size, alpha, beta, k)
    ref = spatial_numpy(x.numpy(), k, alpha, size, beta)
    np.testing.assert_allclose(m(x).numpy(), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m(x.float()).double().numpy(), ref, rtol=2e-6, atol=1e-6)
    assert np.abs(ref - x.numpy()).max() > 0.05 * np.abs(x.numpy()).max()


@pytest.mark.slow
def test_two_forwards_before_the_backwards(backend):
    """Two forwards of the same shape, then the two backwards in either order (gradient
    accumulation, the two towers on one device): each gets the gradient of its own input."""
    backend("compiled")
    k, alpha, n, beta = PROFILES["paper"]
    xs = [activations(shape=(2, 16, 5, 6), seed=s, signed=True) for s in (3, 4)]
    gs = [torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
          for s in (5, 6)]  # fmt: skip
    refs = []
    for x, g in zip(xs, gs, strict=True):
        xr = x.clone().requires_grad_(True)
        lrn_naive_torch(xr.relu(), k, alpha, n, beta, 2).backward(g)
        refs.append(xr.grad)
    for order in ((0, 1), (1, 0)):
        xc = [x.float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
              for x in xs]  # fmt: skip
        outs = [fast_local_response_norm(x, n, alpha, beta, k, 2, relu=True) for x in xc]
        for i in order:
            outs[i].backward(gs[i].float().contiguous(memory_format=torch.channels_last))
        for i in (0, 1):
            err = (xc[i].grad.double() - refs[i]).abs().max() / refs[i].abs().max()
            assert err < 1e-5, (order, i, err)


@pytest.mark.slow
def test_compiled_channels_last_under_inference_mode(backend):
    """Evaluation runs under torch.inference_mode (bench model, predict)."""
    backend("compiled")
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(2, 16, 5, 6), seed=7)
    ref = lrn_numpy(x.numpy(), k, alpha, n, beta, 2)
    with torch.inference_mode():
        out = fast_local_response_norm(x.float().contiguous(memory_format=torch.channels_last), n,
                                  alpha, beta, k, 2)  # fmt: skip
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-5 * abs(ref).max())


def test_bfloat16_is_rounded_once_in_every_form(backend):
    """bf16 maps are summed and powered in float32 and rounded once, in the plain form and the
    fast form's eager backend alike (before, the eager backend worked in bf16 throughout: about
    4x the error of the fused and compiled forms, 1.0e-2 against 2.6e-3)."""
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(2, 32, 6, 6), scale=60.0)
    ref = torch.from_numpy(lrn_numpy(x.bfloat16().double().numpy(), k, alpha, n, beta, 2))
    backend("eager")
    for fn in (local_response_norm, fast_local_response_norm):
        out = fn(x.bfloat16(), n, alpha, beta, k, 2).double()
        err = ((out - ref).abs() / ref.abs().clamp_min(1e-3)).max()
        assert err <= 2**-8, (fn.__name__, err)  # one bf16 rounding: at most 2^-9 relative


@pytest.mark.slow
def test_compiling_the_lrn_leaves_torchs_global_settings_alone(backend):
    """The fast form's compiled kernels use torch.compile as it is configured (before, the
    first compiled LRN raised torch's process-wide recompile limit to 32)."""
    import torch._dynamo.config as dynamo_config  # test only: the setting it must not touch

    before = dynamo_config.recompile_limit
    backend("compiled")
    k, alpha, n, beta = PROFILES["paper"]
    x = activations(shape=(2, 16, 5, 6), seed=8).float().requires_grad_(True)
    fast_local_response_norm(x, n, alpha, beta, k, 2, relu=True).sum().backward()
    assert dynamo_config.recompile_limit == before
