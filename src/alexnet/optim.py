"""The optimiser and the learning-rate schedules of Sec. 5 of the paper and the 2012 code.

- `PaperSGD`: the paper's exact update, v <- m v - wd eps w - eps g; w <- w + v (Sec. 5). Its
  velocity is in units of the parameter; torch.optim.SGD keeps it in units of the gradient and
  multiplies by lr at the step, so the two agree while lr is constant and differ right after an
  lr change (the paper's update keeps the old step's momentum at the old lr).
- `param_groups` / `make_optimizer`: weights, biases and conv1 in separate parameter groups, so
  that bias lr multipliers, bias decay and cuda-convnet's conv1 schedule can act on them.
- `LRSchedule`: the paper's plateau rule ("divide by 10 when the validation error stopped
  improving", Sec. 5) made precise, the step schedules of cuda-convnet and Caffe, and warm-up.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from alexnet.config import TrainConfig
from alexnet.errors import BadInput

OPTIMIZERS = ("paper-sgd", "sgd")
SCHEDULES = ("plateau", "steps", "linear")
CONV1_GROUPS = ("conv1.weight", "conv1.bias")


class PaperSGD(torch.optim.Optimizer):
    """Sec. 5's update rule, per parameter group (each group may carry its own lr and decay):

        v <- momentum * v - weight_decay * lr * w - lr * grad
        w <- w + v

    The velocity (state key "velocity") starts at zero and is in units of the parameter. With a
    constant lr this equals torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False)
    exactly; after an lr change it does not: here the momentum carries the old lr's step.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,  # Sec. 5: momentum 0.9
        weight_decay: float = 5e-4,  # Sec. 5: weight decay 0.0005
        *,
        foreach: bool | None = None,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, velocities = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PaperSGD does not support sparse gradients")
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                velocities.append(state["velocity"])
            if not params:
                continue
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.device.type in ("cpu", "cuda") for p in params)
            if foreach and hasattr(torch, "_foreach_add_"):
                _step_foreach(params, grads, velocities, lr, m, wd)
            else:
                for p, g, v in zip(params, grads, velocities, strict=True):
                    v.mul_(m)
                    if wd != 0:
                        v.add_(p, alpha=-wd * lr)
                    v.add_(g, alpha=-lr)
                    p.add_(v)
        return loss


def _step_foreach(params, grads, velocities, lr: float, m: float, wd: float) -> None:
    # _foreach kernels want one device and dtype per call (two-device models mix devices).
    buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], []])
    for p, g, v in zip(params, grads, velocities, strict=True):
        b = buckets[(p.device, p.dtype, g.dtype)]
        b[0].append(p)
        b[1].append(g)
        b[2].append(v)
    for ps, gs, vs in buckets.values():
        torch._foreach_mul_(vs, m)
        if wd != 0:
            torch._foreach_add_(vs, ps, alpha=-wd * lr)
        torch._foreach_add_(vs, gs, alpha=-lr)
        torch._foreach_add_(ps, vs)


def state_key(param_name: str) -> str:
    """The state_dict key of a parameter: conv1.weight_1 (tower B's part on a second device,
    alexnet.towers) belongs to conv1.weight."""
    return re.sub(r"\.(weight|bias)_\d+$", r".\1", param_name)


def param_groups(
    model: nn.Module, train: TrainConfig, loaded: Collection[str] = ()
) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimiser groups, each with "name" and "lr_mult":

    - "conv1.weight", "conv1.bias": conv1's own groups, the model's `conv1_parameters()` (both
      layouts of alexnet.model have it; cuda-convnet lowers conv1's lr separately at epochs 67
      and 72, layer-params-145 log);
    - "weights": every other parameter with ndim > 1 (lr_mult 1, weight_decay train.weight_decay);
    - "biases": every other 1-D parameter (lr_mult train.bias_lr_mult; weight_decay 0 unless
      train.bias_decay; layer-params-145 / Caffe: bias lr 2x, no bias decay).

    Fine-tuning: the parameters whose state_dict keys are in `loaded` (taken from other weights
    by `train --init`) form groups of their own, "init:<name>", with "loaded": True and lr_mult
    times train.init_lr_mult (LRSchedule freezes them until train.freeze_until).

    Groups with no parameters are left out. "lr" is set to train.lr * lr_mult.
    """
    conv1 = getattr(model, "conv1_parameters", None)  # both layouts of alexnet.model have it
    conv1_ids = {id(p) for p in conv1()} if conv1 is not None else set()
    kinds = (*CONV1_GROUPS, "weights", "biases")
    buckets: dict[str, list[nn.Parameter]] = {
        prefix + kind: [] for prefix in ("", "init:") for kind in kinds
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bias = p.ndim == 1
        if id(p) in conv1_ids:
            kind = "conv1.bias" if bias else "conv1.weight"
        else:
            kind = "biases" if bias else "weights"
        buckets[("init:" if state_key(name) in loaded else "") + kind].append(p)
    bias_decay = train.weight_decay if train.bias_decay else 0.0
    settings = {
        "conv1.weight": (1.0, train.weight_decay),
        "conv1.bias": (train.bias_lr_mult, bias_decay),
        "weights": (1.0, train.weight_decay),
        "biases": (train.bias_lr_mult, bias_decay),
    }
    groups = []
    for name, params in buckets.items():
        if not params:
            continue
        is_loaded = name.startswith("init:")
        lr_mult, wd = settings[name.removeprefix("init:")]
        lr_mult *= train.init_lr_mult if is_loaded else 1.0
        group = {
            "params": params,
            "name": name,
            "lr_mult": lr_mult,
            "weight_decay": wd,
            "lr": train.lr * lr_mult,
        }
        if is_loaded:
            group["loaded"] = True
        groups.append(group)
    return groups


def make_optimizer(
    model: nn.Module, train: TrainConfig, loaded: Collection[str] = ()
) -> torch.optim.Optimizer:
    """PaperSGD ("paper-sgd", Sec. 5) or torch.optim.SGD ("sgd": torchvision's recipe), over
    `param_groups(model, train, loaded)`."""
    groups = param_groups(model, train, loaded)
    if train.optimizer == "paper-sgd":
        return PaperSGD(
            groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
            nesterov=False,
        )
    raise BadInput(
        f"unknown optimizer {train.optimizer!r}; valid optimizers: {', '.join(OPTIMIZERS)}"
    )


class LRSchedule:
    """The learning rate as a function of the (fractional) epoch.

    Epochs count completed passes: epoch 0.0 is the start of training, 25.0 the start of the 26th
    pass, and 24.5 halfway through the 25th. A change "at epoch E" applies from epoch E on.

    lr(epoch) = train.lr * warmup(epoch) * 0.1 ** (drops so far) * group lr_mult, where

    - warm-up (not in the paper; train.warmup_epochs > 0): the factor rises linearly over the
      first warmup_epochs, (step + 1) / warmup_steps at step `step`, so the first step does not
      have lr 0;
    - "steps" (cuda-convnet, Caffe, torchvision): the drops so far are the milestones
      m * epoch_scale <= epoch;
    - "linear" (the demo recipe, not in the paper): lr falls linearly from train.lr after the
      warm-up to 0 at train.epochs, for runs too short for any plateau;
    - "plateau" (the paper, Sec. 5: "divided the learning rate by 10 when the validation error
      rate stopped improving with the current learning rate ... reduced three times"), made
      precise here. `on_validation(epoch, top1_error)` is called after each validation, with
      `epoch` the number of epochs completed (1 after the first pass). The best error so far is
      `best` (none before the first call). An epoch *improves* when top1_error < best -
      train.plateau_threshold (strictly: an improvement by exactly the threshold does not
      count); it then becomes the new best and the count of epochs without improvement resets
      to 0. Otherwise the count grows by 1 (best is kept; a small improvement does not reset
      the count), and when it reaches train.plateau_patience and fewer than train.max_lr_drops
      drops have happened, the lr is divided by 10 from `epoch` on, the count resets to 0 (the
      new lr gets a full `patience` epochs to improve) and best is kept. After max_lr_drops
      drops nothing changes any more.

    The rule waits for the net to start learning (a net still at chance has not "stopped
    improving", it has not begun): given `chance_error` (1 - 1/classes), it is armed only once
    a validation top-1 error is at most chance_error - train.plateau_chance_margin; until then
    no epoch counts against the patience and the lr is kept. `at_chance` says the rule is not
    yet armed; the trainer warns after train.chance_warning_epochs such epochs. Without
    `chance_error` the rule is armed from the first validation.

    cuda-convnet's conv1 schedule (train.conv1_lr_schedule, (epoch, lr) pairs: 1e-5 at 67, 0 at
    72 in the 2012 log) sets the conv1 groups' lr to that absolute value times the group's
    lr_mult from epoch * epoch_scale on. `epoch_scale` (requested epochs / the profile's epochs)
    stretches milestones, the conv1 schedule and train.lighting_off_epoch proportionally, as
    when a 91-epoch recipe runs in 9 epochs; warm-up is not stretched.
    """

    def __init__(
        self,
        train: TrainConfig,
        steps_per_epoch: int,
        epoch_scale: float = 1.0,
        chance_error: float | None = None,
    ):
        if train.schedule not in SCHEDULES:
            raise BadInput(
                f"unknown schedule {train.schedule!r}; valid schedules: {', '.join(SCHEDULES)}"
            )
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        if not epoch_scale > 0:
            raise ValueError(f"epoch_scale must be > 0, got {epoch_scale}")
        self.train = train
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch_scale = float(epoch_scale)
        self.milestones = sorted(float(m) * self.epoch_scale for m in train.milestones)
        self.conv1_schedule = sorted(
            (float(e) * self.epoch_scale, float(lr)) for e, lr in train.conv1_lr_schedule
        )
        self.lighting_off_epoch = (
            None
            if train.lighting_off_epoch is None
            else float(train.lighting_off_epoch) * self.epoch_scale
        )
        # Plateau-rule state (see the class docstring).
        self.chance_error = chance_error
        self.armed = chance_error is None  # the net has left chance (or chance is unknown)
        self.best: float | None = None
        self.bad_epochs = 0
        self._plateau_drops: list[int] = []
        self.epoch = 0.0  # the latest epoch given to apply()

    # --- the schedule ------------------------------------------------------------------------
    def _drop_epochs(self) -> list[float]:
        return self.milestones if self.train.schedule == "steps" else self._plateau_drops

    def warmup(self, epoch: float) -> float:
        w = self.train.warmup_epochs
        if w <= 0:
            return 1.0
        step = math.floor(epoch * self.steps_per_epoch + 1e-9)
        return min(1.0, (step + 1) / (w * self.steps_per_epoch))

    def lr_mult(self, epoch: float) -> float:
        """Multiplier of train.lr at `epoch`: warm-up times 0.1 per drop so far."""
        if self.train.schedule == "linear":  # the demo recipe: decay linearly to 0 at the end
            return self.warmup(epoch) * max(0.0, 1.0 - epoch / self.train.epochs)
        drops = sum(1 for d in self._drop_epochs() if d <= epoch)
        return self.warmup(epoch) * 0.1**drops

    def conv1_lr(self, epoch: float) -> float | None:
        """conv1's absolute lr at `epoch` from train.conv1_lr_schedule, None before the first."""
        lr = None
        for e, value in self.conv1_schedule:
            if e <= epoch:
                lr = value
        return lr

    def apply(self, optimizer: torch.optim.Optimizer, epoch: float) -> float:
        """Set every group's lr for `epoch`; returns the weights' lr (train.lr * lr_mult)."""
        self.epoch = float(epoch)
        base = self.train.lr * self.lr_mult(epoch)
        conv1 = self.conv1_lr(epoch)
        # layer-params-145: cuda-convnet never lowered the bias lr (TrainConfig.bias_lr_fixed).
        fixed_bias = self.train.bias_lr_fixed
        frozen = epoch < self.train.freeze_until  # fine-tuning: loaded layers keep still
        for group in optimizer.param_groups:
            mult, name = group.get("lr_mult", 1.0), str(group.get("name")).removeprefix("init:")
            if frozen and group.get("loaded"):
                group["lr"] = 0.0
            elif conv1 is not None and name in CONV1_GROUPS:  # the logged conv1 changes win
                group["lr"] = conv1 * mult
            elif fixed_bias and name in ("biases", "conv1.bias"):
                group["lr"] = self.train.lr * self.warmup(epoch) * mult
            else:
                group["lr"] = base * mult
        return base

    def on_validation(self, epoch: int, top1_error: float) -> bool:
        """The plateau rule (class docstring); True when it divided the lr by 10 from `epoch`."""
        if not self.armed and top1_error <= self.chance_error - self.train.plateau_chance_margin:
            self.armed = True  # the net has begun to learn
        if self.train.schedule != "plateau" or not self.armed:
            return False  # a fixed schedule; or still at chance, which is not a plateau
        if self.best is None or top1_error < self.best - self.train.plateau_threshold:
            self.best = float(top1_error)
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        if (
            self.bad_epochs >= self.train.plateau_patience
            and len(self._plateau_drops) < self.train.max_lr_drops
        ):
            self._plateau_drops.append(int(epoch))
            self.bad_epochs = 0
            return True
        return False

    @property
    def at_chance(self) -> bool:
        """The validation error has not yet been clearly below chance (the plateau rule waits)."""
        return not self.armed

    def lighting_on(self, epoch: float) -> bool:
        """PCA lighting on at `epoch` (cuda-convnet switched colour noise off at epoch 67)."""
        return self.lighting_off_epoch is None or epoch < self.lighting_off_epoch

    @property
    def drops(self) -> list[float]:
        """Epochs at which the lr was divided by 10 so far (up to the latest apply() epoch for
        "steps"), for plotting. Whole numbers for "plateau"; stretched milestones may not be."""
        if self.train.schedule == "steps":
            return [m for m in self.milestones if m <= self.epoch]
        return list(self._plateau_drops)

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (the config itself is saved with the run)."""
        return {
            "schedule": self.train.schedule,
            "armed": self.armed,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "plateau_drops": list(self._plateau_drops),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("schedule") != self.train.schedule:
            raise BadInput(
                f"lr schedule state is for {state.get('schedule')!r}, "
                f"this run uses {self.train.schedule!r}"
            )
        self.armed = bool(state.get("armed", True))
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self._plateau_drops = [int(e) for e in state["plateau_drops"]]
        self.epoch = float(state["epoch"])
