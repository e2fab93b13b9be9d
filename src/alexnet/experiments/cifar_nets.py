"""The nets of Figure 1 and their plain training loop, usable without the study.

`alexnet figure1` (experiments.figure1) compares ReLU and tanh on these nets; they live apart
from it because they are a library of their own: a small CIFAR-10-sized net in two forms, the
data it reads and its input scaling, and one training run (a `RunSpec` in, its training-error
curve out), with nothing of the study (lr search, seeds, cache, table, figure).

The net (--net four, `FourLayerNet`) is cuda-convnet's small CIFAR-10 example net (example-
layers/layers-80sec.cfg, the 2011 code the paper's Figure 1 came from) with two changes, said
here because the paper does not print its net: three 5x5 convolutions with 32, 32 and 64 kernels
(padding 2), each followed by the activation and a 3x3 stride-2 pooling (max after conv1,
average after conv2 and conv3, output sizes rounded up as cuda-convnet does), then one fully
connected layer to the 10 classes: four weighted layers ("a four-layer convolutional neural
network"). (1) The 2012 file has five: a 64-unit fully connected layer (fc64) sits before fc10;
it is removed here to match the caption's four. (2) The init is PyTorch's default (uniform,
scaled by fan-in), not the file's (std 1e-4 in conv1, 0.01 in conv2-3, 0.1 in the fc layers,
biases 0). And the inputs are divided by the training set's overall std; the 2012 code fed raw
pixels (0-255) minus the mean image. --net layers-80sec (`Layers80SecNet`) runs the file's net
as it is: fc64, its init, raw pixels minus the mean, so a reader can compare the two. No
normalisation, no dropout, no weight decay, no data augmentation ("no regularization of any
kind"). Both nets (ReLU and tanh) start from the same weights (same seed) and see the same
batches in the same order; only the activation and the learning rate differ.

Training (`train_run`): plain SGD with momentum 0.9 (Sec. 5), batch 128 (Sec. 5), cross-entropy.
The training error recorded is the one the 2012 code printed while training: the error of the
net's own predictions on the batches it was being trained on, averaged over a window of 1/P of
an epoch (P = --points-per-epoch), so that the curve costs nothing extra and shows sub-epoch
progress; "seconds" is the training wall time up to the end of each window.

Data: Fashion-MNIST read straight from the IDX files (`load_fashion_mnist`: 28x28 grey images
zero-padded to 32x32, one input channel); CIFAR-10 comes from alexnet.data.sources. `normalise`:
pixels minus the training set's per-pixel mean image (Sec. 2: "subtracting the mean activity"),
then (--net four only) divided by their overall standard deviation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.data.sources import FASHION_MNIST_DIR, idx_file, read_idx
from alexnet.errors import BadInput, NotFound
from alexnet.speed import FastMode, autocast, prepare_input, prepare_model

ACTIVATIONS = ("relu", "tanh")


# --- data ------------------------------------------------------------------------------------
def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 training images, zero-padded from 28x28 to 32x32: uint8 (N, 1, 32, 32)."""
    root = Path(root)
    paths = [
        idx_file(root, stem) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    ]
    if None in paths:
        raise NotFound(
            f"{root}: no Fashion-MNIST IDX files; install Debian's dataset-fashion-mnist or give "
            "CIFAR-10 with --data"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise BadInput(f"{root}: the training images and labels do not match")
    # Pad to the CIFAR-10 size so that one net serves both datasets (as LeNet padded MNIST).
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]
    return images, labels


def normalise(images: np.ndarray, by_std: bool = True) -> torch.Tensor:
    """float32 (N, C, 32, 32): minus the per-pixel mean image (Sec. 2), over the overall std
    (by_std; the 2012 code did not divide: raw 0-255 pixels minus the mean)."""
    x = images.astype(np.float32)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    x -= mean
    if by_std:
        x /= max(float(x.std(dtype=np.float64)), 1e-6)
    return torch.from_numpy(x)


# --- the net ---------------------------------------------------------------------------------
class FourLayerNet(nn.Module):
    """cuda-convnet's layers-80sec.cfg CIFAR-10 net without its (absent) regularisers:
    conv 5x5x32 - max-pool 3/2 - conv 5x5x32 - avg-pool 3/2 - conv 5x5x64 - avg-pool 3/2 - fc.
    The activation follows every convolution; 32 -> 16 -> 8 -> 4 spatially (pool outputs are
    rounded up as in cuda-convnet), so the fc layer sees 64*4*4 = 1024 inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise BadInput(f"activation {activation!r} is not one of {list(ACTIVATIONS)}")
        self.activation = activation
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.pool2 = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.pool3 = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh  # Sec. 3.1
        x = self.pool1(act(self.conv1(x)))
        x = self.pool2(act(self.conv2(x)))
        x = self.pool3(act(self.conv3(x)))
        return self.fc(x.flatten(1))


class Layers80SecNet(FourLayerNet):
    """The 2012 file's net as it is (example-layers/layers-80sec.cfg): FourLayerNet's layers with
    the 64-unit fully connected layer fc64 (and its activation) before fc10, and the file's
    init: N(0, std) weights with std 1e-4 in conv1, 0.01 in conv2 and conv3, 0.1 in fc64 and
    fc10 (its initW), biases 0."""

    INIT_STD = {"conv1": 1e-4, "conv2": 0.01, "conv3": 0.01, "fc64": 0.1, "fc": 0.1}

    def __init__(self, in_channels: int = 3, num_classes: int = 10, activation: str = "relu"):
        super().__init__(in_channels, num_classes, activation)
        self.fc64 = nn.Linear(64 * 4 * 4, 64)
        self.fc = nn.Linear(64, num_classes)
        for name, std in self.INIT_STD.items():
            layer = getattr(self, name)
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu if self.activation == "relu" else torch.tanh  # Sec. 3.1
        x = self.pool1(act(self.conv1(x)))
        x = self.pool2(act(self.conv2(x)))
        x = self.pool3(act(self.conv3(x)))
        return self.fc(act(self.fc64(x.flatten(1))))


# The nets of --net: the net, whether its inputs are divided by their std, and its description.
NETS = {
    "four": (FourLayerNet, True, "cuda-convnet layers-80sec without fc64 (four weighted layers: "
             "conv5x5x32-maxpool3/2-conv5x5x32-avgpool3/2-conv5x5x64-avgpool3/2-fc10), PyTorch's "
             "default init, inputs minus the mean image over their std"),
    "layers-80sec": (Layers80SecNet, False, "cuda-convnet layers-80sec as the 2012 file has it "
                     "(five weighted layers: ...-avgpool3/2-fc64-fc10), the file's init (std 1e-4 "
                     "conv1, 0.01 conv2-3, 0.1 fc, biases 0), raw pixels minus the mean image"),
}  # fmt: skip


# --- one training run ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run (its cache key)."""

    dataset: str
    train_images: int
    activation: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    points_per_epoch: int
    momentum: float = 0.9  # Sec. 5
    mode: str = "fp32"  # speed.FastMode label: fp32, or bf16+cl where the CPU has native bf16
    net: str = "four"  # a key of NETS

    def name(self) -> str:
        net = "" if self.net == "four" else f"-{self.net}"
        return f"{self.activation}-lr{self.lr:g}-seed{self.seed}-{self.epochs}ep-{self.mode}{net}"


def train_run(
    spec: RunSpec,
    x: torch.Tensor,
    y: torch.Tensor,
    device: str | torch.device = "cpu",
    bar=None,
) -> dict[str, Any]:
    """Train one net; the training error over each window of 1/P epoch (see module doc).

    Returns {"epochs": [...], "errors": [...], "seconds": [...], "diverged": bool, ...}: point k
    ends after window k; `seconds` counts training time only.
    """
    device = torch.device(device)
    n = len(y)
    steps_per_epoch = n // spec.batch_size
    if steps_per_epoch < spec.points_per_epoch:
        raise BadInput(
            f"{n} training images make {steps_per_epoch} batches of {spec.batch_size} per epoch, "
            f"fewer than --points-per-epoch {spec.points_per_epoch}"
        )
    # Window boundaries (in batches) within an epoch: P near-equal windows.
    bounds = [
        round(steps_per_epoch * (k + 1) / spec.points_per_epoch)
        for k in range(spec.points_per_epoch)
    ]
    torch.manual_seed(spec.seed)  # the same initial weights for ReLU and tanh
    in_channels = x.shape[1]
    mode = FastMode.from_label(spec.mode)
    model = NETS[spec.net][0](in_channels, int(y.max()) + 1, spec.activation).to(device)
    model = prepare_model(model, mode)  # channels_last if the mode says; CPU allocator tuned
    # Sec. 5: momentum 0.9; no weight decay here (Figure 1: "no regularization of any kind").
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    order_gen = torch.Generator().manual_seed(1000 + spec.seed)  # the same batches for both
    epochs_at, errors, seconds = [], [], []
    elapsed, diverged, done = 0.0, False, 0
    x, y = x.to(device), y.to(device)
    for epoch in range(spec.epochs):
        perm = torch.randperm(n, generator=order_gen).to(device)
        wrong = torch.zeros((), dtype=torch.long, device=device)
        seen, window = 0, 0
        t0 = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = perm[b * spec.batch_size : (b + 1) * spec.batch_size]
            xb, yb = prepare_input(x[idx], mode), y[idx]
            with autocast(mode, device):
                logits = model(xb).float()  # the loss in float32 whatever the autocast dtype
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # The net's predictions on its training batch, before this step's update.
            wrong += (logits.detach().argmax(1) != yb).sum()
            seen += len(yb)
            done += 1
            if bar is not None:
                bar.update(1)
            if b + 1 == bounds[window]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed += time.perf_counter() - t0
                err = float(wrong) / seen
                if not math.isfinite(float(loss.detach())):
                    diverged = True
                epochs_at.append(round(epoch + bounds[window] / steps_per_epoch, 6))
                errors.append(None if diverged else err)
                seconds.append(elapsed)
                wrong.zero_()
                seen, window = 0, window + 1
                t0 = time.perf_counter()
                if diverged:
                    break
        if diverged:
            if bar is not None:  # move the bar past the rest of the run
                bar.update(spec.epochs * steps_per_epoch - done)
            break
    return {
        "spec": asdict(spec),
        "epochs": epochs_at,
        "errors": errors,
        "seconds": seconds,
        "diverged": diverged,
        "steps_per_epoch": steps_per_epoch,
        "device": str(device),
    }
