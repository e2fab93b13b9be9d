"""The AlexNet network (Sec. 3 and Figure 2 of the paper), its variants, and torchvision's.

`build_model(profile, num_classes, devices, **overrides)` is the one way to make a network.

Two-tower layouts (profiles paper, cuda-convnet, caffe) have layers named after the paper,
conv1..conv5, fc6..fc8, norm1/norm2, and one state_dict tensor per layer whatever the devices
(conv2.weight is the grouped 256x48x5x5). One device runs both towers as grouped convolutions;
two devices (`devices=[d0, d1]`) run tower A on d0 and tower B on d1, the paper's two GPUs
(alexnet.towers). Both forms compute the same function.

The `torchvision` layout is torchvision.models.alexnet with its exact state_dict keys.

Both layouts answer the same questions: `feature_vector(x, "fc7")` (Sec. 6.1's 4096-d vector),
`conv1_weight()` (Figure 3) and `conv1_parameters()` (cuda-convnet's conv1 lr schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from alexnet.config import ModelConfig, Profile, check_model_config, get_profile, replace_checked
from alexnet.errors import BadInput
from alexnet.lrn import ResponseNorm, SpatialResponseNorm
from alexnet.speed import network_input
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


class Act(nn.Module):
    """The non-linearity, in place (as torchvision's nn.ReLU(inplace=True)): every activation
    here follows a conv, linear or pool whose backward does not need its output, so overwriting
    it saves a full-size allocation and pass per layer."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # Sec. 3.1: "relu"; "tanh" for Figure 1's comparison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(x) if self.kind == "relu" else torch.tanh_(x)

    def extra_repr(self) -> str:
        return self.kind


class TowerDropout(nn.Module):
    """Dropout of Sec. 4.2 over a layer's parts, with one mask for the whole layer, drawn on the
    first device, so that the one- and the two-device forms consume the random stream alike.

    `rows` = (first row, global batch), set by the trainer under data parallelism: every rank
    draws the global batch's mask and keeps its own rows, so N ranks drop exactly the units one
    process with the whole batch would."""

    def __init__(self, p: float, style: str):
        super().__init__()
        self.p, self.style = p, style
        self.rows: tuple[int, int] | None = None

    def forward(self, xs: Parts) -> Parts:
        p, classic = self.p, self.style == "classic"
        if p == 0:
            return xs
        if not self.training:
            # Sec. 4.2: "at test time, we use all the neurons but multiply their outputs by 0.5"
            # (classic); inverted dropout's test-time layer is the identity.
            return [x * (1.0 - p) for x in xs] if classic else xs
        width, rows = sum(x.shape[1] for x in xs), xs[0].shape[0]
        first, total = self.rows or (0, rows)
        keep = torch.rand(total, width, device=xs[0].device)[first : first + rows] >= p
        masks = keep.split([x.shape[1] for x in xs], 1)
        # Sec. 4.2 and the 2012 code: the survivors are not rescaled (classic); inverted dropout
        # (Caffe, torchvision) scales them by 1 / (1 - p).
        scale = 1.0 if classic else 1.0 / (1.0 - p)
        return [x * m.to(x.device, x.dtype) * scale for x, m in zip(xs, masks, strict=True)]

    def extra_repr(self) -> str:
        return f"p={self.p}, style={self.style}"


def _hooked(model: nn.Module, *names: str) -> bool:
    """Whether a forward hook (global, or on these stages or their submodules) would run."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks
        for name in names
        for m in getattr(model, name).modules()
    )


class AlexNet(nn.Module):
    """The two-tower network of Figure 2 (and its ablations, see ModelConfig).

    The network is a sequence of stages, each a module from parts to parts (alexnet.towers);
    `stages` lists their names in the order of the forward pass."""

    output_layer = "fc8"  # the classifier: re-initialised when fine-tuning on other classes

    def __init__(self, config: ModelConfig, num_classes: int = 1000, devices=("cpu",)):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.devices = [torch.device(d) for d in devices]
        towers = config.towers
        if len(self.devices) not in (1, towers):
            raise BadInput(
                f"devices={list(devices)}: a {towers}-tower net runs on 1 or {towers} devices"
            )
        # Sec. 3.2 comparison net (towers=1): half the kernels in conv1-conv4; conv5 and the FC
        # layers keep their width (the paper's footnote: most parameters are in fc6). Sec. 7:
        # a removed middle layer's successor takes over its connectivity (conv3 crosses).
        convs = [c for c in CONV_SPEC if c[0] != f"conv{config.drop_conv}"]
        cin = 3
        for name, cout, k, s, p, cross in convs:
            cout = cout // 2 if towers == 1 and name != "conv5" else cout
            cross = cross or towers == 1 or (config.drop_conv == 3 and name == "conv4")
            setattr(self, name, TowerConv(cin, cout, k, s, p, cross, towers, self.devices))
            cin = cout
        if config.conv6:  # Sec. 6's "1 CNN*": each tower's 6x6 pooled maps, shape kept
            self.conv6 = TowerConv(cin, cin, 3, 1, 1, towers == 1, towers, self.devices)
            self.act_conv6 = Each(Act(config.activation))
        z = 3 if config.pool == "overlap" else 2  # Sec. 3.4: overlapping max-pool z=3, s=2
        for name in ("pool1", "pool2", "pool5"):
            setattr(self, name, Each(nn.MaxPool2d(z, 2)))
        for i in (1, 2, 3, 4, 5, 6, 7):
            setattr(self, f"act{i}", Each(Act(config.activation)))
        if config.lrn:  # Sec. 3.3: each tower normalises its own maps (Caffe: across both)
            groups = 1 if config.lrn_across_towers else towers
            for name in ("norm1", "norm2"):
                lrn = ResponseNorm(config.lrn_size, config.lrn_alpha, config.lrn_beta,
                                   config.lrn_k, groups)  # fmt: skip
                setattr(self, name, TowerNorm(lrn, config.lrn_across_towers))
        if config.spatial_norm:  # layers-145's "rnorm" after conv2's LRN (constant 1, not k)
            self.snorm2 = Each(
                SpatialResponseNorm(config.spatial_norm_size, config.spatial_norm_alpha,
                                    config.spatial_norm_beta, k=config.spatial_norm_k)
            )  # fmt: skip
        self.flatten = Each(nn.Flatten())  # per-tower channel order = the whole layer's order
        self.fc6 = TowerLinear(cin * 6 * 6, FC_WIDTH, self.devices)
        self.fc7 = TowerLinear(FC_WIDTH, FC_WIDTH, self.devices)
        self.fc8 = TowerLinear(FC_WIDTH, num_classes, self.devices)
        self.drop6 = TowerDropout(config.dropout, config.dropout_style)  # Sec. 4.2: fc6, fc7
        self.drop7 = TowerDropout(config.dropout, config.dropout_style)
        self.stages = self._order(config, [c[0] for c in convs])
        self.reset_parameters()

    def _order(self, config: ModelConfig, convs: list[str]) -> tuple[str, ...]:
        """The stages of the forward pass. Sec. 3.3-3.5 ("paper"): conv -> ReLU -> LRN -> pool;
        layers-145 ("cuda-convnet"): conv1 -> LRN -> pool -> ReLU, conv2 -> ReLU -> LRN ->
        spatial norm -> pool, conv5 -> pool -> ReLU."""
        paper = config.order == "paper"
        blocks = {
            "conv1": ["act1", "norm1", "pool1"] if paper else ["norm1", "pool1", "act1"],
            "conv2": ["act2", "norm2", "snorm2", "pool2"],
            "conv3": ["act3"],
            "conv4": ["act4"],
            "conv5": ["act5"],
        }
        order = []
        for name in convs:
            tail = blocks[name]
            if name == convs[-1]:  # the last conv layer is followed by the last pool
                tail = tail + ["pool5"] if paper else ["pool5", *tail]
            order += [name, *tail]
        order += ["conv6", "act_conv6", "flatten", "fc6", "act6", "drop6", "fc7", "act7", "drop7"]
        order += ["fc8"]
        order = [n for n in order if hasattr(self, n)]  # no LRN, no spatial norm: not there
        # A ReLU right before an LRN is fused into the LRN's passes (alexnet.lrn): same function.
        for i, name in enumerate(order[:-1]):
            if name.startswith("act") and order[i + 1].startswith("norm"):
                if config.activation == "relu":
                    getattr(self, order[i + 1]).relu_first = True
                    order[i] = None
        order = [n for n in order if n is not None]
        # An LRN right before a max-pool runs with it as one pass where it can (alexnet.lrn_pool):
        # the paper's conv1 and conv2 blocks, ReLU -> LRN -> pool.
        self.norm_pool = {
            name: order[i + 1]
            for i, name in enumerate(order[:-1])
            if name.startswith("norm") and order[i + 1].startswith("pool")
        }
        return tuple(order)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Sec. 5: weights from N(0, std), biases constant (values per profile)."""
        for name, layer in self.named_children():
            if isinstance(layer, (TowerConv, TowerLinear)):
                layer.init_(self.config.init_std[name], self.config.init_bias[name], generator)

    @property
    def dropout_rows(self) -> tuple[int, int] | None:
        return self.drop6.rows

    @dropout_rows.setter
    def dropout_rows(self, rows: tuple[int, int] | None) -> None:
        self.drop6.rows = self.drop7.rows = rows  # see TowerDropout

    def check_input(self, x: torch.Tensor) -> None:
        s = self.config.input_size
        expected = f"(N, 3, {s}, {s})"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D input of shape {expected}, got {shape}")
        if x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")

    def _run(self, x: torch.Tensor, until: str | None = None) -> Parts:
        self.check_input(x)
        # 2012 code: 1 + ceil((224 - 11) / 4) = 55 outputs = zero-pad right/bottom by 3.
        xs = [network_input(x, self.config.conv1_pad_right_bottom)]
        # A hook on an LRN or its pool sees each alone: then they run one by one.
        fused = {n: p for n, p in self.norm_pool.items() if not _hooked(self, n, p)}
        skip = None
        for name in self.stages:
            if name == skip:
                continue
            skip = fused.get(name)
            if skip is not None:
                xs = getattr(self, name)(xs, pool=getattr(self, skip).fn)
            else:
                xs = getattr(self, name)(xs)
            if until is not None and until in (name, skip):
                break
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather(self._run(x), self.devices[0])

    def feature_vector(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """fc6's or fc7's output after its ReLU, before dropout (Sec. 6.1: retrieval by the
        4096-d activity of the last hidden layer, fc7)."""
        if layer not in ("fc6", "fc7"):
            raise ValueError(f"feature_vector: layer must be fc6 or fc7, got {layer!r}")
        return gather(self._run(x, until=f"act{layer[2]}"), self.devices[0])

    def conv1_weight(self) -> torch.Tensor:
        return self.conv1.whole("weight")

    def conv1_parameters(self) -> list[nn.Parameter]:
        return list(self.conv1.parameters())


class Dropout(nn.Dropout):
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
            Dropout(config.dropout, config.dropout_style),
            nn.Linear(256 * 6 * 6, 4096),
            act,
            Dropout(config.dropout, config.dropout_style),
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
    return AlexNet(config, num_classes, devices)
