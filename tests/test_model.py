"""The network against the numbers of docs/facts.md and independent references."""

import json

import pytest
import torch

import alexnet
from alexnet.commands import main as cli_main
from alexnet.model import build_model

TWO_TOWER = ["paper", "cuda-convnet", "caffe"]

# Figure 2 / docs/facts.md: output shapes for a 224 input (Caffe: 227 gives the same).
PAPER_SHAPES = {
    "conv1": (96, 55, 55),
    "pool1": (96, 27, 27),
    "conv2": (256, 27, 27),
    "pool2": (256, 13, 13),
    "conv3": (384, 13, 13),
    "conv4": (384, 13, 13),
    "conv5": (256, 13, 13),
    "pool5": (256, 6, 6),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_facts():
    assert count(build_model("paper", num_classes=1000)) == 60_965_224
    assert count(build_model("torchvision", num_classes=1000)) == 61_100_840
    # The same count computed by hand from the layer table of docs/facts.md.
    by_hand = (
        96 * (3 * 11 * 11 + 1)
        + 256 * (48 * 5 * 5 + 1)
        + 384 * (256 * 3 * 3 + 1)
        + 384 * (192 * 3 * 3 + 1)
        + 256 * (192 * 3 * 3 + 1)
        + 4096 * (9216 + 1)
        + 4096 * (4096 + 1)
        + 1000 * (4096 + 1)
    )
    assert by_hand == 60_965_224


@pytest.mark.parametrize("profile", ["paper", "cuda-convnet", "caffe"])
def test_per_layer_output_shapes(profile):
    model = build_model(profile, num_classes=10).eval()
    size = alexnet.get_profile(profile).model.input_size
    shapes = {}
    for name in PAPER_SHAPES:
        module = getattr(model, name)

        def hook(_m, _i, out, name=name):
            out = out[0] if isinstance(out, list) else out
            shapes[name] = tuple(out.shape[1:])

        module.register_forward_hook(hook)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert shapes == PAPER_SHAPES
    assert out.shape == (2, 10)


def test_summary_json_totals(capsys):
    assert cli_main(["summary", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["total_params"] == 60_965_224
    # About 724M multiply-adds per image for the two-tower net (facts, "Throughput references").
    assert 720e6 < s["total_macs"] < 728e6
    layers = {r["layer"]: r for r in s["layers"]}
    assert layers["conv1"]["output"] == [96, 55, 55]
    assert layers["conv1"]["macs"] == 96 * 55 * 55 * 3 * 11 * 11
    assert layers["conv2"]["macs"] == 256 * 27 * 27 * 48 * 5 * 5  # grouped: 48 input maps


def test_profiles_table_lists_differences(capsys):
    assert cli_main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in ["paper", "cuda-convnet", "caffe", "torchvision"]:
        assert name in out
    for key in ["model.lrn_alpha", "model.lrn_k", "model.input_size", "train.bias_lr_mult"]:
        assert key in out
    # torchvision's net keeps PyTorch's default init: the paper's init values are not shown for it
    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("model.")
    }
    assert rows["model.init_std.fc6"][3] == "-" and rows["model.init_std.fc6"][0] == "0.01"
    # paper, cuda-convnet, caffe, torchvision, demo, finetune (the demo's network)
    assert rows["model.dropout_style"] == [
        "classic", "classic", "inverted", "inverted", "classic", "classic"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "profile,std,bias",
    [
        # Sec. 5: N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7, 0 elsewhere.
        (
            "paper",
            dict.fromkeys(["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"], 0.01),
            {
                "conv1": 0,
                "conv2": 1,
                "conv3": 0,
                "conv4": 1,
                "conv5": 1,
                "fc6": 1,
                "fc7": 1,
                "fc8": 0,
            },
        ),  # noqa: E501
        # layers-145: std 0.03 for conv3-5.
        (
            "cuda-convnet",
            {"conv1": 0.01, "conv3": 0.03, "conv4": 0.03, "conv5": 0.03, "fc6": 0.01},
            {"conv2": 1, "fc8": 0},
        ),  # noqa: E501
        # bvlc_alexnet: fc6/fc7 std 0.005, biases 0.1.
        (
            "caffe",
            {"conv1": 0.01, "fc6": 0.005, "fc7": 0.005},
            {"conv1": 0, "conv2": 0.1, "fc7": 0.1, "fc8": 0},
        ),  # noqa: E501
    ],
)
def test_initialisation(profile, std, bias):
    torch.manual_seed(0)
    model = build_model(profile, num_classes=1000)
    for name, s in std.items():
        w = getattr(model, name).weight.detach().double()
        assert abs(w.std().item() / s - 1) < 0.03, name
        assert abs(w.mean().item()) < 0.03 * s, name
    for name, b in bias.items():
        assert torch.all(getattr(model, name).bias == b), name


def lrn_reference(x, size, alpha, beta, k, groups):
    """The printed formula of Sec. 3.3 in float64, one map at a time."""
    x = x.double()
    out = torch.empty_like(x)
    c = x.shape[1]
    per = c // groups
    for i in range(c):
        g0 = (i // per) * per
        lo, hi = max(g0, i - size // 2), min(g0 + per - 1, i + size // 2)
        denom = (k + alpha * (x[:, lo : hi + 1] ** 2).sum(1)) ** beta
        out[:, i] = x[:, i] / denom
    return out


@pytest.mark.parametrize("profile", TWO_TOWER)
def test_model_norm_layers_follow_the_formula(profile):
    model = build_model(profile, num_classes=10)
    m = alexnet.get_profile(profile).model
    # Large activations so the normalisation term matters (alpha * sum ~ k).
    x = torch.randn(2, 96, 7, 7, dtype=torch.float64) * 60
    got = model.norm1(x)
    # The facts: each tower normalises its own 48 maps (paper, 2012 code); Caffe's norm1 has no
    # groups, its window runs across all 96 maps.
    groups = 1 if profile == "caffe" else 2
    ref = lrn_reference(x, m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k, groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    other = lrn_reference(x, m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k, groups=3 - groups)
    assert (got[:, 46:50] - other[:, 46:50]).abs().max() > 1e-3  # the tower boundary matters


def test_cuda_convnet_spatial_norm_has_constant_one():
    """layers-145's rnorm after conv2: 1 + 0.001/25 * sum over the 5x5 window, to the 0.75 (the
    2012 code's spatial kernels have no minDiv, i.e. no k = 2), computed here in float64."""
    model = build_model("cuda-convnet", num_classes=10)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64) * 80
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    ref = torch.empty_like(x)
    for y in range(6):
        for xx in range(6):
            s = (xp[:, :, y : y + 5, xx : xx + 5] ** 2).sum((2, 3))
            ref[:, :, y, xx] = x[:, :, y, xx] / (1 + 0.001 / 25 * s) ** 0.75
    torch.testing.assert_close(model.snorm2(x), ref, rtol=1e-12, atol=1e-12)


def _fc_inputs(model):
    """The inputs of fc7 and fc8 in the last forward pass (after dropout)."""
    seen = {}
    hooks = [
        getattr(model, n).register_forward_pre_hook(
            lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().clone())
        )
        for n in ("fc7", "fc8")
    ]
    return seen, hooks


@pytest.mark.parametrize("profile", ["paper", "cuda-convnet"])
def test_classic_dropout_masks_without_rescaling_and_halves_at_test(profile):
    """Sec. 4.2: in training each fc6/fc7 output is zeroed with probability 0.5 and the others
    are NOT rescaled; at test every output is multiplied by 0.5."""
    torch.manual_seed(0)
    model = build_model(profile, num_classes=10).double()
    assert model.config.dropout_style == "classic" and model.config.dropout == 0.5
    seen, hooks = _fc_inputs(model)
    x = torch.randn(4, 3, 224, 224, dtype=torch.float64) * 50
    model.eval()
    with torch.no_grad():
        model(x)
    test_in = seen["fc7"]
    model.train()
    with torch.no_grad():
        model(x)
    train_in = seen["fc7"]
    for h in hooks:
        h.remove()
    # Where fc6's ReLU output is non-zero, training keeps it as it is (about half the time) or
    # zeroes it; the test pass gave 0.5 times it.
    live = test_in != 0
    kept = live & (train_in != 0)
    assert 0.4 < kept.sum() / live.sum() < 0.6
    torch.testing.assert_close(train_in[kept], 2 * test_in[kept], rtol=1e-12, atol=0)
    assert torch.all(train_in[~live] == 0)


def test_dropout_styles_give_the_same_test_function_with_scaled_weights():
    """A classic-dropout net and the inverted-dropout net whose fc7/fc8 weights are scaled by
    1 - p compute the same function at test time (the facts: the two styles differ in training,
    not in what trained weights mean)."""
    torch.manual_seed(0)
    classic = build_model("paper", num_classes=10).double().eval()
    inverted = build_model("paper", num_classes=10, dropout_style="inverted").double().eval()
    state = classic.state_dict()
    state["fc7.weight"] = state["fc7.weight"] * 0.5
    state["fc8.weight"] = state["fc8.weight"] * 0.5
    inverted.load_state_dict(state)
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64) * 50
    with torch.no_grad():
        torch.testing.assert_close(inverted(x), classic(x), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(classic(x), build_model("paper", num_classes=10).double()
                                  .eval().requires_grad_(False)(x))  # fmt: skip


def test_torchvision_layout_classic_dropout():
    torch.manual_seed(0)
    net = build_model("torchvision", num_classes=10, dropout_style="classic")
    x = torch.randn(8, 9216)
    drop = net.classifier[0]
    drop.eval()
    torch.testing.assert_close(drop(x), 0.5 * x)
    drop.train()
    y = drop(x)
    assert set(torch.unique(y[x != 0] / x[x != 0]).tolist()) <= {0.0, 1.0}


def _seeded_pass(model, x, seed, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    grads = {
        name: torch.cat([p.to("cpu").flatten() for p in _layer_params(model, name)])
        for name in ["conv1", "conv2", "conv3", "conv5", "fc6", "fc8"]
    }
    return out.detach(), grads


def _layer_params(model, name):
    layer = getattr(model, name)
    if hasattr(layer, "weights"):  # the two-device form holds each tower's half on its device
        return [p.grad for p in layer.weights] + [p.grad for p in layer.biases]
    return [
        layer.weight.grad[: layer.weight.shape[0] // 2],
        layer.weight.grad[layer.weight.shape[0] // 2 :],
        layer.bias.grad[: layer.bias.shape[0] // 2],
        layer.bias.grad[layer.bias.shape[0] // 2 :],
    ]  # noqa: E501


@pytest.mark.slow
@pytest.mark.parametrize(
    "train, profile", [(False, "paper"), (True, "paper"), (True, "caffe")]
)  # caffe: its LRN window crosses the towers, so the two-device form gathers the layer
def test_two_device_model_parallel_equals_one_device(train, profile):
    torch.manual_seed(1)
    one = build_model(profile, num_classes=10)
    two = build_model(profile, num_classes=10, devices=["cpu", "cpu"])
    two.load_state_dict(one.state_dict())
    # The state_dict is the same whatever the devices: one grouped tensor per layer.
    sd1, sd2 = one.state_dict(), two.state_dict()
    assert list(sd1) == list(sd2)
    assert sd2["conv2.weight"].shape == (256, 48, 5, 5)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    size = one.config.input_size
    x = torch.randn(3, 3, size, size) * 50
    out1, g1 = _seeded_pass(one, x, 7, train)
    out2, g2 = _seeded_pass(two, x, 7, train)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5 * out1.abs().max().item())
    for name in g1:
        scale = g1[name].abs().max().item()
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-5 * scale)


def test_two_device_keys_and_split_halves():
    two = build_model("paper", num_classes=10, devices=["cpu", "cpu"])
    sd = two.state_dict()
    assert sd["conv2.weight"].shape == (256, 48, 5, 5)
    assert sd["fc6.weight"].shape == (4096, 9216)
    # Each device holds only its half of every layer (no wasted full-size compute).
    assert two.conv2.weights[0].shape == (128, 48, 5, 5)
    assert two.conv3.weights[0].shape == (192, 256, 3, 3)  # conv3 sees both towers
    assert two.fc6.weights[0].shape == (2048, 9216)


OVERRIDES = [
    {},
    {"activation": "tanh"},
    {"lrn": False},
    {"pool": "nonoverlap"},
    {"dropout": 0.0},
    {"towers": 1},
    {"drop_conv": 3},
    {"drop_conv": 4},
    {"drop_conv": 5},
]


@pytest.mark.parametrize("profile", ["paper", "cuda-convnet", "caffe", "torchvision"])
def test_forward_backward_every_profile(profile):
    size = alexnet.get_profile(profile).model.input_size
    model = build_model(profile, num_classes=7).train()
    x = torch.randn(2, 3, size, size) * 50
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides", OVERRIDES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "base"
)  # noqa: E501
def test_forward_backward_every_override(overrides):
    model = build_model("paper", num_classes=5, **overrides).train()
    out = model(torch.randn(2, 3, 224, 224) * 50)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_one_tower_comparison_net_widths():
    # Sec. 3.2: half the kernels in conv1-conv4, conv5 and the FC layers not halved.
    m = build_model("paper", towers=1)
    widths = [getattr(m, f"conv{i}").weight.shape[0] for i in range(1, 6)]
    assert widths == [48, 128, 192, 192, 256]
    assert m.fc6.weight.shape == (4096, 9216)
    assert m.conv2.weight.shape == (128, 48, 5, 5)  # one tower: sees all of conv1


def test_unknown_profile_and_override_are_clear_errors():
    with pytest.raises(ValueError, match="valid profiles: paper"):
        build_model("vgg")
    with pytest.raises(ValueError, match="valid:.*activation"):
        build_model("paper", batchnorm=True)
    with pytest.raises(ValueError, match="relu"):
        build_model("paper", activation="gelu")
    with pytest.raises(ValueError, match="two-tower"):
        build_model("torchvision", towers=2)


@pytest.mark.parametrize(
    "shape", [(2, 1, 224, 224), (2, 3, 100, 100), (3, 224, 224), (2, 4, 224, 224)]
)
def test_bad_input_names_expected_shape(shape):
    model = build_model("paper", num_classes=3)
    with pytest.raises(ValueError, match=r"\(N, 3, 224, 224\)"):
        model(torch.randn(*shape))


def test_torchvision_layout_loads_torchvision_state_dict_exactly():
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.alexnet(num_classes=10).eval()
    ours = build_model("torchvision", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_demo_recipe_keeps_the_papers_network():
    """The demo may change the recipe, not the network (training issue): every architectural
    field of its ModelConfig is the paper's (Sec. 3: two towers, 224 input, ReLU, LRN n=5 k=2
    alpha=1e-4 beta=0.75, overlapping pooling, five conv layers); only the initialisation and the
    training-time dropout differ, and its parameter count is the paper's 60,965,224 (the facts
    file, 1000 classes)."""
    import dataclasses

    from alexnet.config import get_profile

    demo, paper = get_profile("demo").model, get_profile("paper").model
    differ = {
        f.name for f in dataclasses.fields(demo) if getattr(demo, f.name) != getattr(paper, f.name)
    }
    assert differ <= {"init_std", "init_bias", "dropout"}, differ
    assert (demo.towers, demo.input_size, demo.lrn_size, demo.lrn_k) == (2, 224, 5, 2.0)
    assert (demo.lrn_alpha, demo.lrn_beta, demo.pool, demo.drop_conv) == (
        1e-4,
        0.75,
        "overlap",
        None,
    )
    n = sum(p.numel() for p in build_model("demo", num_classes=1000).parameters())
    assert n == 60_965_224


def test_conv6_variant_shapes_and_count_by_hand():
    """Sec. 6's "1 CNN*" (docs/facts.md, our choice of shape): 256 kernels 3x3 over each tower's
    own 128 pooled 6x6 maps, pad 1, ReLU; fc6 keeps 9216 inputs. Counted by hand: 256 kernels of
    128 x 3 x 3 weights plus 256 biases; multiply-adds 256 x 6 x 6 outputs x 128 x 3 x 3."""
    from alexnet.summary import summarize

    extra_params = 256 * (128 * 3 * 3) + 256
    extra_macs = 256 * 6 * 6 * (128 * 3 * 3)
    assert (extra_params, extra_macs) == (295_168, 10_616_832)
    net = build_model("paper", num_classes=1000, conv6=True)
    assert count(net) == 60_965_224 + extra_params
    assert net.conv6.weight.shape == (256, 128, 3, 3) and net.fc6.weight.shape == (4096, 9216)
    shapes = {}
    net.conv6.register_forward_hook(lambda _m, _i, out: shapes.__setitem__("c6", out.shape))
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    assert tuple(shapes["c6"]) == (1, 256, 6, 6)
    # Grouped: kernel i of tower A sees only tower A's maps (changing tower B's input leaves
    # tower A's conv6 outputs alone).
    x = torch.randn(2, 256, 6, 6)
    y = net.conv6(x)
    x2 = x.clone()
    x2[:, 128:] += 1.0
    y2 = net.conv6(x2)
    assert torch.equal(y[:, :128], y2[:, :128]) and not torch.equal(y[:, 128:], y2[:, 128:])
    s = summarize("paper", conv6=True)
    row = next(r for r in s["layers"] if r["layer"] == "conv6")
    assert row == {"layer": "conv6", "output": [256, 6, 6], "params": extra_params,
                   "macs": extra_macs}  # fmt: skip
    assert s["total_params"] == 60_965_224 + extra_params
    assert s["total_macs"] == 724_406_816 + extra_macs
