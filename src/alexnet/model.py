"""The AlexNet network (Sec. 3 and Figure 2 of the paper), its variants, and the two-GPU split.

`build_model(profile, num_classes, devices, **overrides)` is the one way to make a network.

Two-tower layouts (profiles paper, cuda-convnet, caffe) have layers named after the paper,
conv1..conv5, fc6..fc8, norm1/norm2, and one state_dict tensor per layer whatever the devices
(conv2.weight is the grouped 256x48x5x5). On one device the towers are grouped convolutions; on
two devices (`devices=[d0, d1]`) tower A's half of every layer lives on d0 and tower B's on d1,
and activations cross devices only where the paper's towers communicate: conv3 and the fully
connected layers (Sec. 3.2). Both forms compute the same function.

The `torchvision` layout is torchvision.models.alexnet with its exact state_dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.config import ModelConfig, Profile, get_profile, replace_checked
from alexnet.lrn import ResponseNorm, SpatialResponseNorm

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


class _Parts(nn.Module):
    """A conv or linear layer of the two-tower net, held whole (one device) or as one slice of
    output units per device (two devices). The state_dict always holds the whole tensors."""

    def __init__(self, weight_shape, devices, splits: Sequence[int]):
        super().__init__()
        self.devices = [torch.device(d) for d in devices]
        self.splits = list(splits)  # output units held by each part
        if len(self.devices) == 1:
            self.weight = nn.Parameter(torch.empty(weight_shape, device=self.devices[0]))
            self.bias = nn.Parameter(torch.empty(weight_shape[0], device=self.devices[0]))
        else:
            # Plain attributes weight_0, weight_1, ... (no child module), so that the state_dict
            # overrides below are the only view of this layer's tensors.
            for i, (n, d) in enumerate(zip(self.splits, self.devices, strict=True)):
                self.register_parameter(
                    f"weight_{i}", nn.Parameter(torch.empty((n, *weight_shape[1:]), device=d))
                )
                self.register_parameter(f"bias_{i}", nn.Parameter(torch.empty(n, device=d)))

    @property
    def weights(self) -> list[nn.Parameter]:
        return [getattr(self, f"weight_{i}") for i in range(len(self.devices))]

    @property
    def biases(self) -> list[nn.Parameter]:
        return [getattr(self, f"bias_{i}") for i in range(len(self.devices))]

    @property
    def split(self) -> bool:
        return len(self.devices) > 1

    def whole(self, name: str) -> torch.Tensor:
        """The layer's whole weight or bias (on the first device)."""
        if not self.split:
            return getattr(self, name)
        parts = self.weights if name == "weight" else self.biases
        return torch.cat([p.to(self.devices[0]) for p in parts])

    @torch.no_grad()
    def init_(self, std: float, bias: float, generator: torch.Generator | None = None) -> None:
        # Draw the whole tensor on the CPU so that every device layout gets identical weights.
        for name, fill in (("weight", None), ("bias", bias)):
            shape = self.whole(name).shape
            value = (
                torch.full(shape, float(fill))
                if fill is not None
                else torch.randn(shape, generator=generator) * std
            )
            self._set_whole(name, value)

    @torch.no_grad()
    def _set_whole(self, name: str, value: torch.Tensor) -> None:
        if not self.split:
            getattr(self, name).copy_(value)
            return
        parts = self.weights if name == "weight" else self.biases
        for p, chunk in zip(parts, value.split(self.splits), strict=True):
            p.copy_(chunk)

    # state_dict / load_state_dict see one tensor per layer, whatever the devices.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.split:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "bias"):
            t = self.whole(name)
            destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        if not self.split:
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing, unexpected, errors
            )
        for name in ("weight", "bias"):
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                continue
            value, expected = state_dict[key], self.whole(name).shape
            if value.shape != expected:
                errors.append(f"size mismatch for {key}: {tuple(value.shape)} vs {tuple(expected)}")
                continue
            self._set_whole(name, value)
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix) :] not in ("weight", "bias"):
                    unexpected.append(key)


class TowerConv(_Parts):
    """A convolution of the two-tower net. `cross`: every output map sees all input maps;
    otherwise each tower's maps see only their own tower's input maps (grouped)."""

    def __init__(self, cin, cout, kernel, stride, pad, cross, towers, devices):
        self.cross, self.towers, self.stride, self.pad = cross, towers, stride, pad
        per_tower_in = cin if cross else cin // towers
        super().__init__(
            (cout, per_tower_in, kernel, kernel), devices, [cout // len(devices)] * len(devices)
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.split:
            x = xs[0]
            if self.cross and self.towers > 1 and x.device.type == "cpu":
                # Sec. 3.2: each tower computes its half of a crossing layer's kernels from all
                # the input maps; done so here too, because on CPUs oneDNN's weight-gradient
                # kernel for conv1's 96 maps is ~2x slower per multiply-add than for 48
                # (measured: conv1 forward+backward 6.7 -> 4.8 ms/image, BENCHMARKS.md).
                ws, bs = self.weight.chunk(self.towers), self.bias.chunk(self.towers)
                halves = zip(ws, bs, strict=True)
                return [torch.cat([F.conv2d(x, w, b, self.stride, self.pad) for w, b in halves], 1)]
            groups = 1 if self.cross else self.towers
            return [F.conv2d(x, self.weight, self.bias, self.stride, self.pad, 1, groups)]
        if self.cross:  # gather every tower's maps onto each device (Sec. 3.2)
            xs = [torch.cat([x.to(d) for x in xs], 1) for d in self.devices]
        return [
            F.conv2d(x, w, b, self.stride, self.pad)
            for x, w, b in zip(xs, self.weights, self.biases, strict=True)
        ]


class TowerLinear(_Parts):
    """A fully connected layer: every unit sees all inputs (the towers communicate, Sec. 3.2)."""

    def __init__(self, fin, fout, devices):
        n = len(devices)
        splits = [math.ceil(fout / n)] * (n - 1)
        splits.append(fout - sum(splits))
        super().__init__((fout, fin), devices, splits)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.split:
            return [F.linear(xs[0], self.weight, self.bias)]
        return [
            F.linear(torch.cat([x.to(d) for x in xs], 1), w, b)
            for d, w, b in zip(self.devices, self.weights, self.biases, strict=True)
        ]


class AlexNet(nn.Module):
    """The two-tower network of Figure 2 (and its ablations, see ModelConfig)."""

    def __init__(self, config: ModelConfig, num_classes: int = 1000, devices=("cpu",)):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.devices = [torch.device(d) for d in devices]
        self.dropout_rows: tuple[int, int] | None = None  # see _dropout
        towers = config.towers
        if len(self.devices) not in (1, towers):
            raise ValueError(
                f"devices={list(devices)}: a {towers}-tower net runs on 1 or {towers} devices"
            )
        self.pool_kernel = 3 if config.pool == "overlap" else 2  # Sec. 3.4: z=3, s=2 overlaps
        # In place (as torchvision's nn.ReLU(inplace=True)): every activation here follows a
        # conv, linear or pool whose backward does not need its output, so overwriting it is
        # safe and saves a full-size allocation and pass per layer.
        act = {"relu": F.relu_, "tanh": torch.tanh_}
        self._act = act[config.activation]

        # Sec. 3.2 comparison net (towers=1): half the kernels in conv1-conv4; conv5 and the FC
        # layers keep their width (the paper's footnote: most parameters are in fc6).
        convs = []
        for name, cout, k, s, p, cross in CONV_SPEC:
            if towers == 1 and name != "conv5":
                cout //= 2
            if config.drop_conv is not None and name == f"conv{config.drop_conv}":
                continue
            convs.append((name, cout, k, s, p, cross))
        cin = 3
        for i, (name, cout, k, s, p, cross) in enumerate(convs):
            # After a removed layer the next one takes over its connectivity (conv3 crosses).
            if config.drop_conv == 3 and name == "conv4":
                cross = True
            layer = TowerConv(cin, cout, k, s, p, cross or towers == 1, towers, self.devices)
            setattr(self, name, layer)
            cin = cout
            if i == len(convs) - 1:
                self._last_conv = name
        self._convs = [c[0] for c in convs]
        # Sec. 3.4: overlapping max-pool z=3, s=2 after norm1, norm2 and the last conv layer.
        self.pool1 = nn.MaxPool2d(self.pool_kernel, 2)
        self.pool2 = nn.MaxPool2d(self.pool_kernel, 2)
        self.pool5 = nn.MaxPool2d(self.pool_kernel, 2)
        if config.lrn:
            lrn = dict(size=config.lrn_size, alpha=config.lrn_alpha, beta=config.lrn_beta)
            # Sec. 3.3: each tower normalises its own maps; Caffe's window spans all of them.
            groups = 1 if config.lrn_across_towers else towers
            self.norm1 = ResponseNorm(**lrn, k=config.lrn_k, groups=groups)
            self.norm2 = ResponseNorm(**lrn, k=config.lrn_k, groups=groups)
        if config.spatial_norm:
            self.snorm2 = SpatialResponseNorm(
                config.spatial_norm_size,
                config.spatial_norm_alpha,
                config.spatial_norm_beta,
                k=config.spatial_norm_k,  # 1 in the 2012 code, not the cross-map k
            )
        self.fc6 = TowerLinear(cin * 6 * 6, FC_WIDTH, self.devices)
        self.fc7 = TowerLinear(FC_WIDTH, FC_WIDTH, self.devices)
        self.fc8 = TowerLinear(FC_WIDTH, num_classes, self.devices)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Sec. 5: weights from N(0, std), biases constant (values per profile)."""
        for name in (*self._convs, "fc6", "fc7", "fc8"):
            getattr(self, name).init_(
                self.config.init_std[name], self.config.init_bias[name], generator
            )

    # --- forward -------------------------------------------------------------------------
    def _each(self, fn, xs):
        return [fn(x) for x in xs]

    def _norm(self, module, xs, act=None):
        """module(act(x)) for each part; act None: no activation first."""
        if module is None or (act is not None and self.config.activation != "relu"):
            xs = xs if act is None else self._each(act, xs)
            act = None
        if module is None:
            return xs
        # One device: the module normalises each tower's group of maps. Two: each part is a tower.
        # A ReLU before the LRN is fused into the LRN's passes (alexnet.lrn): same function.
        relu = act is not None
        if len(xs) == 1:
            return [module(xs[0], relu=relu)]
        if module.groups == 1:  # a window across the towers (Caffe): normalise the whole layer
            whole = module(torch.cat([x.to(self.devices[0]) for x in xs], 1), relu=relu)
            parts = whole.split([x.shape[1] for x in xs], 1)
            return [p.to(x.device) for p, x in zip(parts, xs, strict=True)]
        return [module(x, groups=1, relu=relu) for x in xs]

    def _pool(self, module, xs):
        return self._each(module, xs)

    def _dropout(self, xs):
        p, classic = self.config.dropout, self.config.dropout_style == "classic"
        if p == 0:
            return xs
        if not self.training:
            # Sec. 4.2: "at test time, we use all the neurons but multiply their outputs by 0.5"
            # (classic); inverted dropout's test-time layer is the identity.
            return [x * (1.0 - p) for x in xs] if classic else xs
        # One mask for the whole layer, drawn on the first device, so that the one- and the
        # two-device forms consume the random stream identically and compute the same function.
        # Under data parallelism (`dropout_rows` = (first row, global batch), set by the
        # trainer) every rank draws the global batch's mask and keeps its own rows: N ranks then
        # drop exactly the units one process with the whole batch would.
        width, rows = sum(x.shape[1] for x in xs), xs[0].shape[0]
        first, total = self.dropout_rows or (0, rows)
        keep = torch.rand(total, width, device=xs[0].device)[first : first + rows] >= p
        masks = keep.split([x.shape[1] for x in xs], 1)
        # Sec. 4.2 and the 2012 code: the survivors are not rescaled (classic); inverted dropout
        # (Caffe, torchvision) scales them by 1 / (1 - p).
        scale = 1.0 if classic else 1.0 / (1.0 - p)
        return [x * m.to(x.device, x.dtype) * scale for x, m in zip(xs, masks, strict=True)]

    def check_input(self, x: torch.Tensor) -> None:
        s = self.config.input_size
        expected = f"(N, 3, {s}, {s})"
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D input of shape {expected}, got {shape}")
        if x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        c, act, order = self.config, self._act, self.config.order
        norm1, norm2 = getattr(self, "norm1", None), getattr(self, "norm2", None)
        if c.conv1_pad_right_bottom:
            # 2012 code: 1 + ceil((224 - 11) / 4) = 55 outputs = zero-pad right/bottom by 3.
            x = F.pad(x, (0, c.conv1_pad_right_bottom, 0, c.conv1_pad_right_bottom))
        if x.device.type == "cpu":
            # On CPUs the net runs channels_last whatever the input's format (same function):
            # torch's NCHW max-pool is ~5x slower than its NHWC one on the 96 and 256 maps
            # pooled here, and the LRN's kernels suit it (alexnet.lrn). Measured in BENCHMARKS.md.
            x = x.contiguous(memory_format=torch.channels_last)
        xs = [x.to(d) for d in self.devices] if len(self.devices) > 1 else [x]
        xs = self.conv1([xs[0]]) if len(self.devices) == 1 else self._conv1_split(xs)
        if order == "cuda-convnet":  # layers-145: conv1 -> LRN -> pool -> ReLU
            xs = self._each(act, self._pool(self.pool1, self._norm(norm1, xs)))
        else:  # Sec. 3.3-3.5: conv -> ReLU -> LRN -> pool
            xs = self._pool(self.pool1, self._norm(norm1, xs, act))
        for name in self._convs[1:]:
            xs = getattr(self, name)(xs)
            last = name == self._last_conv
            if name == "conv2":
                xs = self._norm(norm2, xs, act)
                if c.spatial_norm:
                    xs = self._each(self.snorm2, xs)
                xs = self._pool(self.pool2, xs)
            elif last and order == "cuda-convnet":  # layers-145: conv5 -> pool -> ReLU
                xs = self._each(act, self._pool(self.pool5, xs))
            else:
                xs = self._each(act, xs)
                if last:
                    xs = self._pool(self.pool5, xs)
        xs = [x.flatten(1) for x in xs]  # per-tower channel order = the whole layer's order
        xs = self._dropout(self._each(act, self.fc6(xs)))
        xs = self._dropout(self._each(act, self.fc7(xs)))
        xs = self.fc8(xs)
        return xs[0] if len(xs) == 1 else torch.cat([x.to(self.devices[0]) for x in xs], 1)

    def _conv1_split(self, xs):
        # conv1 "crosses" only in that both towers see the image: each device has the image.
        layer = self.conv1
        return [
            F.conv2d(x, w, b, layer.stride, layer.pad)
            for x, w, b in zip(xs, layer.weights, layer.biases, strict=True)
        ]

    def features(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        """The activations of fc6 or fc7 after ReLU (Figure 4 retrieval uses fc7's 4096)."""
        acts = {}

        def grab(name):
            def hook(_module, _inputs, outputs):
                out = outputs if isinstance(outputs, list) else [outputs]
                acts[name] = torch.cat([o.to(self.devices[0]) for o in out], 1)

            return hook

        handle = getattr(self, layer).register_forward_hook(grab(layer))
        try:
            self.forward(x)
        finally:
            handle.remove()
        return self._act(acts[layer])


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

    def features_of(self, x: torch.Tensor, layer: str = "fc7") -> torch.Tensor:
        self.check_input(x)
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        upto = 3 if layer == "fc6" else 6
        return self.classifier[:upto](x)


_CHOICES = {
    "activation": ("relu", "tanh"),
    "pool": ("overlap", "nonoverlap"),
    "towers": (1, 2),
    "drop_conv": (3, 4, 5, None),
    "order": ("paper", "cuda-convnet"),
    "layout": ("two-tower", "torchvision"),
    "dropout_style": ("classic", "inverted"),
}
_TWO_TOWER_ONLY = (
    "lrn", "pool", "towers", "drop_conv", "spatial_norm", "order", "lrn_across_towers",
)  # fmt: skip


def resolve_model_config(profile: str | Profile | ModelConfig, **overrides: Any) -> ModelConfig:
    """The profile's ModelConfig with the overrides applied and checked."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    config = profile.model if isinstance(profile, Profile) else profile
    if config.layout == "torchvision":
        bad = sorted(set(overrides) & set(_TWO_TOWER_ONLY))
        if bad:
            raise ValueError(
                f"override(s) {', '.join(bad)} apply to the two-tower profiles "
                "(paper, cuda-convnet, caffe), not to torchvision's layout"
            )
    config = replace_checked(config, "model", **overrides)
    for name, valid in _CHOICES.items():
        if getattr(config, name) not in valid:
            raise ValueError(f"{name}={getattr(config, name)!r} is not one of {list(valid)}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout} must be in [0, 1)")
    return config


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
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    devices = list(devices) if devices is not None else ["cpu"]
    if config.layout == "torchvision":
        if len(devices) != 1:
            raise ValueError("the torchvision layout has one tower: give one device")
        return TorchvisionAlexNet(config, num_classes).to(devices[0])
    return AlexNet(config, num_classes, devices)
