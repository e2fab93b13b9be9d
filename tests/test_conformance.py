"""The network behaves as any PyTorch module, plain and fused (alexnet.fast), for the paper,
cuda-convnet and caffe profiles on one device.

What a PyTorch user relies on, each checked against an independent reference: ONNX export run
in onnxruntime (two different inputs, so a graph frozen into a constant fails), torch.export in
eval and train mode, torch.compile(fullgraph=True) (no graph break), float64 end to end against
the two-device form (other code: alexnet.towers), the fine-tuning idiom (a new fc8 trains),
hooks and feature extraction on every stage that runs, deepcopy, pickling and state_dicts.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet import fast, lrn_pool
from alexnet.model import build_model

PROFILES = ["paper", "cuda-convnet", "caffe"]
FORMS = ["plain", "fused"]


def _net(profile: str, form: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    net = build_model(profile, num_classes=10, **overrides)
    if form == "fused":
        fast.fuse(net)
        assert fast.is_fused(net)
    return net


def _inputs(net: nn.Module, n: int = 2, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    s = net.config.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, s, s, generator=g, dtype=dtype) * 50


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().detach())


def test_fused_net_holds_its_operator_where_it_applies():
    """The fused form runs the torch.library operator on this machine (else every fused test
    below would test the fallback only)."""
    assert lrn_pool.available(), lrn_pool._state["error"]
    net = _net("paper", "fused").eval()
    ep = torch.export.export(net, (_inputs(net),))
    assert "alexnet.lrn_max_pool" in str(ep.graph)


# --- ONNX ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_onnx_export_runs_in_onnxruntime(profile, form, exporter, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net = _net(profile, form).eval()
    x1, x2 = _inputs(net, seed=1), _inputs(net, seed=2)
    path = tmp_path / "net.onnx"
    kwargs = {"dynamo": exporter == "dynamo", "input_names": ["x"], "output_names": ["y"]}
    if exporter == "dynamo":
        kwargs["external_data"] = False
    torch.onnx.export(net, (x1,), str(path), **kwargs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = []
    for x in (x1, x2):
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            want = net(x).numpy()
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 * np.abs(outs[0]).max()  # not a constant


# --- torch.export ----------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_torch_export_equals_eager(profile, form, train):
    net = _net(profile, form).train(train)
    x = _inputs(net)
    ep = torch.export.export(net, (x,))
    torch.manual_seed(5)  # the same dropout masks in train mode
    got = ep.module()(x)
    torch.manual_seed(5)
    want = net(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    x2 = _inputs(net, seed=7)
    torch.manual_seed(5)
    got2 = ep.module()(x2)
    torch.manual_seed(5)
    torch.testing.assert_close(got2, net(x2), rtol=1e-6, atol=1e-6 * got2.abs().max().item())


# --- torch.compile ---------------------------------------------------------------------------
def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _compiled_equals_eager(net, x, backend: str, tol: float) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=backend)  # a graph break raises
    net.zero_grad()
    y = compiled(x)
    y.square().sum().backward()
    g = _grads(net)
    net.zero_grad()
    y0 = net(x)
    y0.square().sum().backward()
    g0 = _grads(net)
    torch.testing.assert_close(y, y0, rtol=tol, atol=tol * y0.abs().max().item())
    # The gradients against float64's (an independent reference): eager float32's own error
    # differs by CPU (2.7e-4 relative in conv1's weight gradient on an AMD EPYC with AVX-512,
    # where the compiled kernels' is 2e-6), so the compiled ones must be within 10 tol of
    # float64's or no further from them than eager's are.
    n64 = copy.deepcopy(net).double()
    n64.zero_grad()
    n64(x.double()).square().sum().backward()
    g64 = _grads(n64)
    for name in g0:  # relative to the whole gradient (conv1's is a sum of many products)
        err = lambda g: float((g[name].double() - g64[name]).norm() / g64[name].norm())  # noqa: E731, B023
        assert err(g) < max(tol * 10, 2 * err(g0)), (name, err(g), err(g0))


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_compile_fullgraph_aot(profile, form):
    """Dynamo captures the whole forward and AOT autograd the backward, no graph break."""
    net = _net(profile, form, dropout=0.0).train()
    _compiled_equals_eager(net, _inputs(net), "aot_eager", 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_compile_fullgraph_inductor(form):
    """Inductor's kernels (the plain LRN fused by Inductor; the operator called as itself)."""
    net = _net("paper", form, dropout=0.0).train()
    _compiled_equals_eager(net, _inputs(net), "inductor", 1e-5)


# --- float64 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_float64_end_to_end_equals_the_two_device_form(profile, form):
    """Output and every gradient in float64 against the two-device form (alexnet.towers: each
    tower's maps normalised apart, the FC layers split by units), to 1e-12 (before: 8e-8 at
    norm1, float32 scratch for float64 inputs)."""
    net = _net(profile, form, dropout=0.0).double()
    two = build_model(profile, num_classes=10, devices=["cpu", "cpu"], dropout=0.0).double()
    two.load_state_dict(net.state_dict())
    x = _inputs(net, dtype=torch.float64)
    outs = []
    for m in (net, two):
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12 * outs[1].abs().max())
    assert outs[0].dtype == torch.float64
    for key in net.state_dict():
        name, kind = key.rsplit(".", 1)
        layer = getattr(two, name)  # each device holds a slice of the layer's units
        g1 = torch.cat([p.grad for p in (layer.weights if kind == "weight" else layer.biases)])
        g0 = getattr(getattr(net, name), kind).grad
        torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12 * g1.abs().max().item())


# --- fine-tuning, hooks, feature extraction --------------------------------------------------
def _finetune(net: nn.Module, x: torch.Tensor, steps: int = 4, lr: float = 3e-4):
    """The tutorials' idiom on a built net: a new last layer for 3 classes, SGD on it all."""
    torch.manual_seed(3)
    if hasattr(net, "classifier"):
        net.classifier[6] = nn.Linear(4096, 3)
    else:
        net.fc8 = nn.Linear(4096, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    conv1 = net.conv1_weight().detach().clone()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net(x).shape == (6, 3)
    assert not torch.equal(net.conv1_weight(), conv1)  # the whole net trains, not only fc8
    return losses


@pytest.mark.parametrize("profile", PROFILES)
def test_replacing_fc8_and_training_plain_and_fused_alike(profile):
    """A new fc8 for 3 classes (before: TypeError, the layers passed lists of parts); the plain
    and the fused net take the same steps (the same losses to float32 rounding)."""
    x = _inputs(_net(profile, "plain"), n=6)
    plain = _finetune(_net(profile, "plain"), x)
    fused = _finetune(_net(profile, "fused"), x)
    assert all(np.isfinite(plain))
    np.testing.assert_allclose(fused, plain, rtol=1e-4)


def test_replacing_torchvisions_classifier_and_training():
    net = build_model("torchvision", num_classes=10, dropout=0.0)
    x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 50
    losses = _finetune(net, x, steps=6, lr=1e-3)
    assert losses[-1] < losses[0] * 0.95, losses


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_forward_and_backward_hooks_fire_on_every_stage(profile, form):
    """Every named stage runs as itself: a forward hook on each fires once, a full backward
    hook on each that has a gradient fires once (before: act1/act2 never ran, a backward hook
    on pool1 was skipped on the fused path)."""
    net = _net(profile, form).train()
    fired, back = [], []
    names = [n for n, _ in net.named_children()]
    for name, m in net.named_children():
        m.register_forward_hook(lambda *_a, name=name: fired.append(name))
        m.register_full_backward_hook(lambda *_a, name=name: back.append(name))
    x = _inputs(net).requires_grad_()
    net(x).sum().backward()
    assert fired == names
    assert set(back) == set(names)


def test_feature_extraction_sees_every_stage():
    tv = pytest.importorskip("torchvision.models.feature_extraction")
    net = _net("paper", "plain").eval()
    extractor = tv.create_feature_extractor(net, return_nodes={"act7": "fc7", "pool1": "pool1"})
    x = _inputs(net)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["fc7"], net.feature_vector(x, "fc7"))
    assert out["pool1"].shape == (2, 96, 27, 27)


def test_print_shows_what_runs_and_unfuse_gives_the_plain_net_back():
    net = _net("paper", "plain")
    plain = repr(net)
    fast.fuse(net)
    assert "LRNMaxPool" in repr(net) and "(norm1): Identity()" in repr(net)
    fast.unfuse(net)
    assert repr(net) == plain and not fast.is_fused(net)


# --- copies, pickles, state_dicts, saved runs ------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_deepcopy_pickle_and_state_dict_round_trip(form):
    net = _net("paper", form).eval()
    x = _inputs(net)
    with torch.no_grad():
        want = net(x)
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        copies = [
            copy.deepcopy(net),
            pickle.loads(pickle.dumps(net)),
            torch.load(buf, weights_only=False),
        ]
        fresh = build_model("paper", num_classes=10).eval()
        fresh.load_state_dict(net.state_dict())
        copies.append(fresh)
        for c in copies:
            torch.testing.assert_close(c(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert list(net.state_dict()) == list(fresh.state_dict())  # fusing changes no key


# --- conv1 on the image's blocks (alexnet.fast.SpaceToDepthConv) -------------------------------
@pytest.mark.parametrize(
    "size, pad, padding",
    [(59, (0, 3, 0, 3), (0, 0)), (63, (0, 0, 0, 0), (0, 0)), (56, (1, 2, 0, 3), (2, 2))],
)
def test_the_block_form_of_conv1_is_the_strided_conv(size, pad, padding):
    """space_to_depth_conv2d against F.conv2d in float64 (the reference: torch's own strided
    convolution of the zero-padded image): output and both gradients to rounding, for the
    paper's geometry (pad1 by 3), Caffe's (no padding) and an asymmetric one, on small images
    (float64 convs of channels_last maps take a slow path in torch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(96, 3, 11, 11, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(96, generator=g, dtype=torch.float64).requires_grad_()
    want = F.conv2d(F.pad(x, pad), w, b, stride=4, padding=padding)
    got = fast.space_to_depth_conv2d(x, w, b, 4, padding, pad)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want_g = torch.autograd.grad(want, (w, b), gy)
    got_g = torch.autograd.grad(got, (w, b), gy)
    for a, e in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12 * e.abs().max().item())


@pytest.mark.parametrize("size, pad", [(224, (0, 3, 0, 3)), (227, None)])
def test_the_block_form_runs_in_bf16_as_close_to_float64_as_the_strided_conv(size, pad):
    """Under CPU bf16 autocast the fused conv1 (paper: pad1 to 227; Caffe: 227, no pad)
    computes on blocks; its output and weight gradient are as close to the float64 function as
    the plain strided conv's in bf16 (within 1.5x of its error); in float32 it runs the strided
    conv (outputs equal)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 96, 11, 4)
    layers = (conv,) if pad is None else (nn.ZeroPad2d(pad), conv)
    fused = fast.SpaceToDepthConv(copy.deepcopy(conv), copy.deepcopy(layers[0]) if pad else None)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref = nn.Sequential(*copy.deepcopy(layers)).double()
    want = ref(x.double())
    gy = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (want_gw,) = torch.autograd.grad(want, ref[-1].weight, gy)
    errors = []
    for module, w in ((nn.Sequential(*layers), conv.weight), (fused, fused.weight)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        assert y.dtype == torch.bfloat16
        (gw,) = torch.autograd.grad(y, w, gy.to(y.dtype))
        errors.append((_rel(y.detach().double(), want), _rel(gw.double(), want_gw)))
    (plain_y, plain_g), (block_y, block_g) = errors
    assert block_y <= 1.5 * plain_y + 1e-3 and block_g <= 1.5 * plain_g + 1e-3, errors
    with torch.no_grad():
        torch.testing.assert_close(fused(x), nn.Sequential(*layers)(x), rtol=0, atol=0)
