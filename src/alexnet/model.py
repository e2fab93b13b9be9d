"""The AlexNet network (Sec. 3 and Figure 2 of the paper), its variants, and torchvision's.

`build_model(profile, num_classes, devices, **overrides)` is the one way to make a network.

Two-tower layouts (profiles paper, cuda-convnet, caffe) have layers named after the paper,
conv1..conv5, fc6..fc8, norm1/norm2, and one state_dict tensor per layer whatever the devices
(conv2.weight is the grouped 256x48x5x5). On one device (`AlexNet`) the network is a sequence of
plain modules, tensors in and out, in the order they run: print it to see what runs, hook any
layer, replace one (`model.fc8 = nn.Linear(4096, 3)`), export or compile it like any PyTorch
model; the towers are grouped convolutions. On two devices (`devices=[d0, d1]`,
`TwoDeviceAlexNet`) tower A runs on d0 and tower B on d1, the paper's two GPUs (alexnet.towers).
Both forms compute the same function.

build_model returns the plain network. `alexnet.fast.fuse(model)` rewrites it into the fast one
(ReLU -> LRN -> pool as one operator), visibly and reversibly; `alexnet train`, the benchmarks
and the demo do. Why plain by default: it is what every PyTorch tool expects and is exact in
every dtype; the fused operator covers float32 and bfloat16 on CPUs only (docs/architecture.md).

The `torchvision` layout is torchvision.models.alexnet with its exact state_dict keys.

Both layouts answer the same questions: `feature_vector(x, "fc7")` (Sec. 6.1's 4096-d vector),
`conv1_weight()` (Figure 3) and `conv1_parameters()` (cuda-convnet's conv1 lr schedule).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alexnet.config import ModelConfig, Profile, check_model_config, get_profile, replace_checked
from alexnet.errors import BadInput
from alexnet.lrn import LocalResponseNorm, SpatialResponseNorm
from alexnet.towers import Each, Parts, TowerConv, TowerLinear, TowerNorm, gather

# Kernels per layer and tower connectivity of Figure 2; "cross" layers see both towers' maps.
#          name     out   kernel stride pad  cross
CONV_SPEC = (
    ("conv1", 96, 11, 4, 0, True),  # both towers see the image
    ("conv2", 256, 5, 1, 2, False),
    ("conv3", 384, 3, 1, 1, True),  # the towers communicate here
    ("conv4", 384, 3, 1, 1, False),
    ("conv5", 256, 3, 1, 1, False),
)
FC_WIDTH = 4096  # Sec. 3.5: 4096 neurons in each fully connected layer
META = torch.device("meta")


def activation(kind: str) -> nn.Module:
    """Sec. 3.1: ReLU; tanh for Figure 1's comparison. Not in place (torchvision's are): a full
    backward hook on the layer before it would refuse an output modified in place."""
    return nn.ReLU() if kind == "relu" else nn.Tanh()


def dropout_mask(total: int, width: int, rows: tuple[int, int], p: float, device) -> torch.Tensor:
    """The units kept, one mask for the whole layer: (rows) of a (total, width) draw."""
    first, n = rows
    return torch.rand(total, width, device=device)[first : first + n] >= p


torch.fx.wrap("dropout_mask")  # one node in torch.fx's symbolic traces (feature extraction)


class Dropout(nn.Module):
    """Dropout of Sec. 4.2 on fc6's and fc7's outputs.

    classic (the paper, the 2012 code): survivors kept as they are, outputs x (1 - p) at test
    ("at test time, we use all the neurons but multiply their outputs by 0.5"); inverted (Caffe,
    torchvision): survivors x 1 / (1 - p), the identity at test.

    `rows` = (first row, global batch), set by the trainer under data parallelism: every rank
    draws the global batch's mask and keeps its own rows, so N ranks drop exactly the units one
    process with the whole batch would (and the two-device form draws the same mask)."""

    def __init__(self, p: float, style: str):
        super().__init__()
        self.p, self.style = p, style
        self.rows: tuple[int, int] | None = None

    def scale(self) -> float:
        return 1.0 if self.style == "classic" else 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0:
            return x
        if not self.training:
            return x * (1.0 - self.p) if self.style == "classic" else x
        total = self.rows[1] if self.rows else x.shape[0]
        rows = (self.rows[0] if self.rows else 0, x.shape[0])
        keep = dropout_mask(total, x.shape[1], rows, self.p, x.device)
        return x * keep.to(x.dtype) * self.scale()

    def extra_repr(self) -> str:
        return f"p={self.p}, style={self.style}"


def _two_tower_stages(config: ModelConfig, num_classes: int) -> OrderedDict:
    """The one-device network's stages in the order they run (Sec. 3, Figure 2), the weighted
    layers on the meta device (no memory, no random draws: _init_two_tower draws them).

    Sec. 3.3-3.5 ("paper"): conv -> ReLU -> LRN -> pool; layers-145 ("cuda-convnet"): conv1 ->
    LRN -> pool -> ReLU, conv2 -> ReLU -> LRN -> spatial norm -> pool, conv5 -> pool -> ReLU."""
    towers, act = config.towers, config.activation
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    pad = config.conv1_pad_right_bottom
    if pad:  # 2012 code: 1 + ceil((224 - 11) / 4) = 55 outputs = zero-pad right/bottom by 3
        stages["pad1"] = nn.ZeroPad2d((0, pad, 0, pad))
    # Sec. 3.2 comparison net (towers=1): half the kernels in conv1-conv4; conv5 and the FC
    # layers keep their width (the paper's footnote: most parameters are in fc6). Sec. 7:
    # a removed middle layer's successor takes over its connectivity (conv3 crosses).
    convs = [c for c in CONV_SPEC if c[0] != f"conv{config.drop_conv}"]
    z = 3 if config.pool == "overlap" else 2  # Sec. 3.4: overlapping max-pool z=3, s=2
    groups = 1 if config.lrn_across_towers else towers  # Sec. 3.3: each tower its own maps
    paper = config.order == "paper"

    def lrn():
        return LocalResponseNorm(config.lrn_size, config.lrn_alpha, config.lrn_beta,
                                 config.lrn_k, groups)  # fmt: skip

    cin = 3
    for name, cout, k, s, p, cross in convs:
        i = name[-1]
        cout = cout // 2 if towers == 1 and name != "conv5" else cout
        cross = cross or towers == 1 or (config.drop_conv == 3 and name == "conv4")
        stages[name] = nn.Conv2d(cin, cout, k, s, p, groups=1 if cross else towers, device=META)
        cin = cout
        tail = [f"act{i}"]
        if name == "conv1" and config.lrn:
            tail = [f"act{i}", "norm1", "pool1"] if paper else ["norm1", "pool1", f"act{i}"]
        elif name == "conv1":
            tail = [f"act{i}", "pool1"]
        elif name == "conv2":
            tail = [f"act{i}"] + (["norm2"] if config.lrn else [])
            tail += (["snorm2"] if config.spatial_norm else []) + ["pool2"]
        if name == convs[-1][0]:  # the last conv layer is followed by the last pool
            tail = [*tail, "pool5"] if paper else ["pool5", *tail]
        for stage in tail:
            if stage.startswith("act"):
                stages[stage] = activation(act)
            elif stage.startswith("norm"):
                stages[stage] = lrn()
            elif stage.startswith("pool"):
                stages[stage] = nn.MaxPool2d(z, 2)
            else:  # layers-145's "rnorm" after conv2's LRN (constant 1, not k)
                stages[stage] = SpatialResponseNorm(
                    config.spatial_norm_size, config.spatial_norm_alpha,
                    config.spatial_norm_beta, k=config.spatial_norm_k,
                )  # fmt: skip
    if config.conv6:  # Sec. 6's "1 CNN*": each tower's 6x6 pooled maps, shape kept
        stages["conv6"] = nn.Conv2d(
            cin, cin, 3, 1, 1, groups=1 if towers == 1 else towers, device=META
        )
        stages["act_conv6"] = activation(act)
    stages["flatten"] = nn.Flatten()  # per-tower channel order = the whole layer's order
    for name, fin, fout in (("fc6", cin * 6 * 6, FC_WIDTH), ("fc7", FC_WIDTH, FC_WIDTH)):
        stages[name] = nn.Linear(fin, fout, device=META)
        stages[f"act{name[2]}"] = activation(act)
        stages[f"drop{name[2]}"] = Dropout(config.dropout, config.dropout_style)  # Sec. 4.2
    stages["fc8"] = nn.Linear(FC_WIDTH, num_classes, device=META)
    return stages


def _check_two_tower_input(config: ModelConfig, x) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (feature extraction): no shape yet
        return
    s = config.input_size
    expected = f"(N, 3, {s}, {s})"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D input of shape {expected}, got {shape}")
    if x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
        raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")


def _init_two_tower(model: nn.Module, config: ModelConfig, generator=None) -> None:
    """Sec. 5: weights from N(0, std), biases constant (values per profile). Each tensor is
    drawn whole on the CPU, in the order the layers run, so that both forms get identical
    weights."""
    with torch.no_grad():
        for name, layer in model.named_children():
            if name not in config.init_std:
                continue
            std, bias = config.init_std[name], config.init_bias[name]
            if isinstance(layer, (TowerConv, TowerLinear)):
                layer.init_(std, bias, generator)
            else:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                layer.bias.fill_(float(bias))


class AlexNet(nn.Sequential):
    """The two-tower network of Figure 2 (and its ablations, see ModelConfig) on one device:
    its stages, in the order they run, as plain modules (see _two_tower_stages)."""

    output_layer = "fc8"  # the classifier: re-initialised when fine-tuning on other classes

    def __init__(self, config: ModelConfig, num_classes: int = 1000):
        super().__init__(_two_tower_stages(config, num_classes))
        self.config, self.num_classes = config, num_classes
        self.to_empty(device="cpu")
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_two_tower(self, self.config, generator)

    @property
    def dropout_rows(self) -> tuple[int, int] | None:
        return self.drop6.rows

    @dropout_rows.setter
    def dropout_rows(self, rows: tuple[int, int] | None) -> None:
        self.drop6.rows = self.drop7.rows = rows  # see Dropout

    def check_input(self, x: torch.Tensor) -> None:
        _check_two_tower_input(self.config, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(x)

    def feature_vector(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """fc6's or fc7's output after its ReLU, before dropout (Sec. 6.1: retrieval by the
        4096-d activity of the last hidden layer, fc7)."""
        if layer not in ("fc6", "fc7"):
            raise ValueError(f"feature_vector: layer must be fc6 or fc7, got {layer!r}")
        self.check_input(x)
        for name, stage in self.named_children():
            x = stage(x)
            if name == f"act{layer[2]}":
                return x
        raise AssertionError("unreachable: every two-tower net has act6 and act7")

    def conv1_weight(self) -> torch.Tensor:
        return self.conv1.weight

    def conv1_parameters(self) -> list[nn.Parameter]:
        return list(self.conv1.parameters())


class TwoDeviceAlexNet(nn.Module):
    """The same network with tower A on one device and tower B on another (Sec. 3.2): every
    stage maps a list of per-device parts to parts (alexnet.towers), with the one-device
    network's stage names and state_dict keys."""

    output_layer = "fc8"

    def __init__(self, config: ModelConfig, num_classes: int, devices):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.devices = [torch.device(d) for d in devices]
        if len(self.devices) != config.towers:
            raise BadInput(
                f"devices={list(devices)}: a {config.towers}-tower net runs on 1 or "
                f"{config.towers} devices"
            )
        for name, m in _two_tower_stages(config, num_classes).items():
            if isinstance(m, nn.Conv2d):
                cross = m.groups == 1
                part = TowerConv(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0],
                                 m.padding[0], cross, config.towers, self.devices)  # fmt: skip
            elif isinstance(m, nn.Linear):
                part = TowerLinear(m.in_features, m.out_features, self.devices)
            elif isinstance(m, LocalResponseNorm):
                part = TowerNorm(m, config.lrn_across_towers)
            elif isinstance(m, Dropout):
                part = TowerDropout(m)
            else:
                part = Each(m)
            self.add_module(name, part)
        self.stages = tuple(n for n, _ in self.named_children())
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        _init_two_tower(self, self.config, generator)

    @property
    def dropout_rows(self) -> tuple[int, int] | None:
        return self.drop6.dropout.rows

    @dropout_rows.setter
    def dropout_rows(self, rows: tuple[int, int] | None) -> None:
        self.drop6.dropout.rows = self.drop7.dropout.rows = rows

    def check_input(self, x: torch.Tensor) -> None:
        _check_two_tower_input(self.config, x)

    def _run(self, x: torch.Tensor, until: str | None = None) -> Parts:
        self.check_input(x)
        xs = [x.to(self.devices[0])]
        for name in self.stages:
            xs = getattr(self, name)(xs)
            if name == until:
                break
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather(self._run(x), self.devices[0])

    def feature_vector(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        if layer not in ("fc6", "fc7"):
            raise ValueError(f"feature_vector: layer must be fc6 or fc7, got {layer!r}")
        return gather(self._run(x, until=f"act{layer[2]}"), self.devices[0])

    def conv1_weight(self) -> torch.Tensor:
        return self.conv1.whole("weight")

    def conv1_parameters(self) -> list[nn.Parameter]:
        return list(self.conv1.parameters())


class TowerDropout(nn.Module):
    """Dropout over a layer's parts: the one-device mask (Dropout), drawn whole on the first
    device and split, so that both forms consume the random stream alike."""

    def __init__(self, dropout: Dropout):
        super().__init__()
        self.dropout = dropout

    def forward(self, xs: Parts) -> Parts:
        d = self.dropout
        if d.p == 0 or not d.training:
            return [d(x) for x in xs]
        width, n = sum(x.shape[1] for x in xs), xs[0].shape[0]
        rows = (d.rows[0] if d.rows else 0, n)
        keep = dropout_mask(d.rows[1] if d.rows else n, width, rows, d.p, xs[0].device)
        masks = keep.split([x.shape[1] for x in xs], 1)
        return [x * m.to(x.device, x.dtype) * d.scale() for x, m in zip(xs, masks, strict=True)]


class TorchvisionDropout(nn.Dropout):
    """nn.Dropout (inverted: survivors x 1/(1-p) in training, identity at test) or the paper's
    classic dropout (Sec. 4.2: survivors kept as they are, outputs x (1-p) at test)."""

    def __init__(self, p: float = 0.5, style: str = "inverted"):
        super().__init__(p)
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "inverted" or self.p == 0:
            return super().forward(x)
        if not self.training:
            return x * (1.0 - self.p)
        return x * (torch.rand_like(x) >= self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, style={self.style}"


class TorchvisionAlexNet(nn.Module):
    """torchvision.models.alexnet's layout, parameter for parameter and key for key."""

    output_layer = "classifier.6"

    def __init__(self, config: ModelConfig, num_classes: int = 1000):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        act = nn.ReLU(inplace=True) if config.activation == "relu" else nn.Tanh()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2),
            act,
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            act,
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            act,
            nn.Conv2d(384, 256, 3, padding=1),
            act,
            nn.Conv2d(256, 256, 3, padding=1),
            act,
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            TorchvisionDropout(config.dropout, config.dropout_style),
            nn.Linear(256 * 6 * 6, 4096),
            act,
            TorchvisionDropout(config.dropout, config.dropout_style),
            nn.Linear(4096, 4096),
            act,
            nn.Linear(4096, num_classes),
        )

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected input of shape (N, 3, 224, 224), got {shape}")
        if min(x.shape[2:]) < 63:  # the smallest input that survives the three pools
            raise ValueError(
                f"expected input of shape (N, 3, 224, 224) (at least 63x63), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def feature_vector(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """fc6's or fc7's output after its ReLU (classifier[2] or [5]), before any dropout."""
        if layer not in ("fc6", "fc7"):
            raise ValueError(f"feature_vector: layer must be fc6 or fc7, got {layer!r}")
        self.check_input(x)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        upto = 3 if layer == "fc6" else 6
        return self.classifier[:upto](x)

    def conv1_weight(self) -> torch.Tensor:
        return self.features[0].weight

    def conv1_parameters(self) -> list[nn.Parameter]:
        return list(self.features[0].parameters())


_TWO_TOWER_ONLY = (
    "lrn", "pool", "towers", "drop_conv", "spatial_norm", "order", "lrn_across_towers", "conv6",
)  # fmt: skip


def resolve_model_config(profile: str | Profile | ModelConfig, **overrides: Any) -> ModelConfig:
    """The profile's ModelConfig with the overrides applied and checked."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    config = profile.model if isinstance(profile, Profile) else profile
    if config.layout == "torchvision":
        bad = sorted(set(overrides) & set(_TWO_TOWER_ONLY))
        if bad:
            raise BadInput(
                f"override(s) {', '.join(bad)} apply to the two-tower profiles "
                "(paper, cuda-convnet, caffe), not to torchvision's layout"
            )
    return check_model_config(replace_checked(config, "model", **overrides))


def build_model(
    profile: str | Profile | ModelConfig = "paper",
    num_classes: int = 1000,
    devices: Sequence[str | torch.device] | None = None,
    **overrides: Any,
) -> nn.Module:
    """The network of a profile, e.g. build_model("paper", num_classes=10, lrn=False).

    devices: None or one device for the one-device form; two devices for the paper's two-GPU
    model parallelism (tower A on devices[0], tower B on devices[1]).
    """
    config = resolve_model_config(profile, **overrides)
    if num_classes < 1:
        raise BadInput(f"num_classes must be positive, got {num_classes}")
    devices = list(devices) if devices is not None else ["cpu"]
    if config.layout == "torchvision":
        if len(devices) != 1:
            raise BadInput("the torchvision layout has one tower: give one device")
        return TorchvisionAlexNet(config, num_classes).to(devices[0])
    if len(devices) == 1:
        return AlexNet(config, num_classes).to(devices[0])
    return TwoDeviceAlexNet(config, num_classes, devices)
