"""Configuration as data: one frozen dataclass per concern, and the named profiles.

A profile is a named, frozen set of values: the network (`ModelConfig`), the data views
(`DataConfig`) and the training recipe (`TrainConfig`). The CLI maps its flags onto the same
dataclasses with `dataclasses.replace`, and every run saves the fully resolved config as JSON.

Sources for every number: docs/facts.md (the paper, the 2012 cuda-convnet code `layers-145.cfg` /
`layer-params-145.cfg`, Caffe's bvlc_alexnet, torchvision).

Why one file of this length: every value a run can take, the named profiles and the checks
on them belong together (`alexnet profiles` and a reader see them in one place); most of the
length is the profiles' values, each with its citation.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from alexnet.errors import BadInput

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")  # Figure 2
# Sec. 6: "one CNN with an extra sixth convolutional layer over the last pooling layer" (the
# paper's "1 CNN*"); optional (ModelConfig.conv6), so old configurations need no value for it.
OPTIONAL_LAYERS = ("conv6",)


def _per_layer(default: float, **values: float) -> dict[str, float]:
    """A value per weighted layer; conv6 takes conv5's unless given (the layer it follows)."""
    out = {name: default for name in LAYERS}
    out.update(values)
    out.setdefault("conv6", out["conv5"])
    return out


@dataclass(frozen=True)
class ModelConfig:
    """The network. Two-tower layouts follow the paper's Figure 2; "torchvision" is its net."""

    layout: str = "two-tower"  # "two-tower" (paper, cuda-convnet, caffe) or "torchvision"
    input_size: int = 224  # Sec. 3.5/4.1: 224x224 patches (Caffe: 227)
    # The 2012 code computes 1 + ceil((in + 2*pad - k) / stride): 224 -> 55 equals zero-padding
    # the right and bottom edges by 3 (layers-145 conv1). 0 for Caffe's 227 input.
    conv1_pad_right_bottom: int = 3
    # Layer order of conv1/conv2/conv5. "paper": conv -> ReLU -> LRN -> pool (Sec. 3.3, 3.5).
    # "cuda-convnet": conv1 -> LRN -> pool -> ReLU; conv2 ReLU -> LRN -> spatial norm -> pool;
    # conv5 pool -> ReLU (layers-145.cfg).
    order: str = "paper"
    activation: str = "relu"  # Sec. 3.1: ReLU; "tanh" for the Figure 1 comparison
    lrn: bool = True  # Sec. 3.3: response normalisation after conv1 and conv2
    lrn_size: int = 5  # Sec. 3.3: n = 5 adjacent kernel maps
    lrn_k: float = 2.0  # Sec. 3.3: k = 2
    lrn_alpha: float = 1e-4  # Sec. 3.3: alpha = 1e-4, used as printed (not divided by n)
    lrn_beta: float = 0.75  # Sec. 3.3: beta = 0.75
    # Sec. 3.3 / 3.2: each tower normalises its own maps (the towers meet only at conv3 and the
    # FC layers). Caffe's bvlc_alexnet norm1/norm2 have no groups: the window spans all maps.
    lrn_across_towers: bool = False
    # layers-145 "rnorm" after conv2's LRN: spatial 5x5 contrast normalisation, scale 0.001
    # divided by 5^2 by the parser, pow 0.75. Only in the cuda-convnet profile.
    spatial_norm: bool = False
    spatial_norm_size: int = 5
    spatial_norm_alpha: float = 0.001 / 25
    spatial_norm_beta: float = 0.75
    # The 2012 code's spatial kernels compute 1 + scale * sum (layer.py reads minDiv only for the
    # cross-map norm): the additive constant is 1, not the cross-map LRN's k = 2.
    spatial_norm_k: float = 1.0
    pool: str = "overlap"  # Sec. 3.4: overlapping max-pool z=3, s=2 ("nonoverlap": z=2, s=2)
    dropout: float = 0.5  # Sec. 4.2: dropout 0.5 on fc6 and fc7
    # Sec. 4.2 "at test time, we use all the neurons but multiply their outputs by 0.5" (and the
    # 2012 code): "classic" masks without rescaling in training and scales by 1 - p at test.
    # "inverted" (Caffe, torchvision) scales the survivors by 1 / (1 - p) in training and is the
    # identity at test: the same test-time function for weights trained with it, a different
    # training run from the same init and lr.
    dropout_style: str = "classic"
    towers: int = 2  # Sec. 3.2: two towers; 1 = the one-GPU comparison net (half conv kernels)
    drop_conv: int | None = None  # Sec. 3 end: remove conv3, conv4 or conv5 (about 2% worse)
    # Sec. 6's "1 CNN*": an extra conv layer over the last pooling layer. The paper gives no
    # shape; ours (docs/facts.md): 256 kernels 3x3, pad 1, each tower over its own 128 pooled
    # 6x6 maps, then ReLU and no pooling, so fc6 keeps its 9216 inputs.
    conv6: bool = False
    # Sec. 5: weights N(0, 0.01) everywhere; biases 1 in conv2, conv4, conv5, fc6, fc7.
    init_std: dict[str, float] = field(default_factory=lambda: _per_layer(0.01))
    init_bias: dict[str, float] = field(
        default_factory=lambda: _per_layer(0.0, conv2=1.0, conv4=1.0, conv5=1.0, fc6=1.0, fc7=1.0)
    )


@dataclass(frozen=True)
class DataConfig:
    """The data views (Sec. 4.1 of the paper and the 2012 code's convdata.py)."""

    image_size: int = 256  # Sec. 2: shorter side rescaled to 256, central 256x256 patch
    crop_size: int = 224  # Sec. 4.1: random 224x224 patches (Caffe: 227)
    flip: bool = True  # Sec. 4.1: horizontal reflections
    # Sec. 4.1 PCA lighting: offset = eigvec @ (alpha * eigval), alpha ~ N(0, 0.1).
    lighting_std: float = 0.1  # 0 turns it off (Caffe has none)
    # "paper": eigvec @ (alpha * eigval). "cuda-convnet": eigvec @ (alpha * sqrt(eigval)) and the
    # image divided by 1.1 afterwards (convdata.py).
    lighting: str = "paper"
    # Crops and flips shared by chunks of this many images (cuda-convnet: 32; paper: 1).
    crop_chunk: int = 1
    # Sec. 2: subtract the mean image. "image": the matching crop of the 256x256 mean image;
    # "center": the central crop of the mean image for every crop (cuda-convnet); "channel":
    # per-channel mean (Caffe later, torchvision-style normalisation uses "channel-std").
    mean: str = "image"
    # Multiplies the network input after the mean subtraction. The paper and the 2012 code feed
    # raw 0-255 pixel values minus the mean (1.0); many reimplementations use the [0, 1] scale.
    input_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (Sec. 5 of the paper unless noted)."""

    epochs: int = 90  # Sec. 5: roughly 90 cycles through the training set
    # Images per epoch: None is the whole train split; a number makes each epoch the first N
    # images of that epoch's random order (the CPU demo's budget).
    epoch_images: int | None = None
    # At least this many optimiser steps in the run whatever the dataset's size: an epoch of a
    # split too small for them is more than one pass over it, the passes each in their own
    # random order (RunSpec.steps_per_epoch; the loader cycles). Not in the paper: the
    # fine-tuning recipe's floor, for folders of a few hundred images (0: none).
    min_steps: int = 0
    batch_size: int = 128  # Sec. 5: batch size 128
    optimizer: str = "paper-sgd"  # Sec. 5's exact update: v <- 0.9v - 5e-4*eps*w - eps*g
    lr: float = 0.01  # Sec. 5: equal learning rate 0.01 for all layers
    momentum: float = 0.9  # Sec. 5
    weight_decay: float = 5e-4  # Sec. 5
    bias_lr_mult: float = 1.0  # layer-params-145 / Caffe: 2.0 (bias epsB = 2 * epsW)
    bias_decay: bool = True  # layer-params-145 / Caffe: no weight decay on biases
    bias_lr_fixed: bool = False  # layer-params-145: the bias lr was never lowered
    # "plateau": divide by 10 when validation error stops improving (Sec. 5), at most
    # `max_lr_drops` times. "steps": divide by 10 at `milestones` (epochs).
    schedule: str = "plateau"
    max_lr_drops: int = 3  # Sec. 5: "reduced three times prior to termination"
    plateau_patience: int = 3  # epochs without improvement before a drop (our documented rule)
    plateau_threshold: float = 0.001  # an improvement must beat the best top-1 error by this
    # The plateau rule waits until the net has started to learn: it is armed once the top-1
    # error has been at least this far below chance (1 - 1/classes); a net still at chance has
    # not "stopped improving" (Sec. 5), it has not begun. Before that the lr is kept.
    plateau_chance_margin: float = 0.05
    # After this many epochs still within plateau_chance_margin of chance: a loud warning in the
    # log, metrics.jsonl and TensorBoard (0: never).
    chance_warning_epochs: int = 3
    milestones: tuple[float, ...] = ()  # epochs at which lr /= 10 (for schedule="steps")
    # cuda-convnet's log: conv1 lr to 1e-5 at epoch 67 and 0 at 72; colour noise off at 67.
    conv1_lr_schedule: tuple[tuple[float, float], ...] = ()  # (epoch, lr) pairs
    lighting_off_epoch: float | None = None
    warmup_epochs: float = 0.0  # not in the paper; linear lr warm-up (demo recipe)
    # Fine-tuning from other weights (`train --init`; Sec. 6's pre-training then fine-tuning):
    # the lr of the loaded layers is init_lr_mult times the new layers'; they get lr 0 until
    # epoch freeze_until (a value >= epochs freezes them for the whole run).
    init_lr_mult: float = 1.0
    freeze_until: float = 0.0
    label_smoothing: float = 0.0  # not in the paper


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes (not part of the recipe)."""

    data: str = ""  # the prepared store (alexnet prepare)
    out: str = ""  # the run folder
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    # Sec. 3.2: 2 puts tower A on one device and tower B on the next (cuda:k, cuda:k+1); on a
    # CPU both towers run in one process, which computes the same function (tests).
    model_parallel: int = 1
    workers: int | None = None  # loader worker processes (None: the loader's default)
    # Where JPEG records are decoded: "cpu" (the loader workers), "gpu" (nvJPEG on the run's
    # GPU), "auto" (the GPU when a measurement at the start says it is faster; CPU devices: cpu).
    decode: str = "auto"
    fast: bool = True  # mixed precision / channels_last where measured faster (speed.py)
    compile: bool | None = None  # torch.compile (None: as speed.default_fast_mode says)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    log_every: int = 20  # a metrics.jsonl/TensorBoard line every N steps
    # Stop after this many steps in all (tests, smoke runs, the first epochs of a long recipe);
    # a stop at an epoch's last step still validates and checkpoints that epoch.
    max_steps: int | None = None
    eval_batch_size: int = 256
    val_limit: int | None = None  # validate on N images spread over the split (None: all)
    # Fine-tuning (Sec. 6: pre-trained, then fine-tuned): start from these weights (a run folder
    # or a .safetensors file) instead of the profile's initialisation; see checkpoint.init_from.
    init: str = ""
    # The statistics the views use when fine-tuning: "store", the training store's own (as the
    # paper fine-tuned on ILSVRC-2012 with its own mean image), or "init", those saved with the
    # --init weights (the pre-trained network's input distribution).
    init_stats: str = "store"


@dataclass(frozen=True)
class RunSpec:
    """One run's whole configuration, resolved and checked once (`RunSpec.checked`): the
    recipe, the run settings, and what follows from them alone. The trainer, the loaders and
    the commands read this object; config.json records it ("profile", "run")."""

    profile: Profile
    run: RunConfig

    @classmethod
    def checked(cls, profile: Profile, run: RunConfig) -> RunSpec:
        """BadInput naming the field unless the program can run every value."""
        return cls(check_profile(profile), check_run_config(run))

    @property
    def epoch_scale(self) -> float:
        """A named profile's schedule (milestones, warm-up, lr drops) is laid out for its own
        number of epochs; --epochs stretches it by this factor."""
        own = PROFILES.get(self.profile.name)
        return self.profile.train.epochs / (own.train.epochs if own else self.profile.train.epochs)

    def steps_per_epoch(self, train_images: int) -> int:
        """Optimiser steps in one epoch of a train split of `train_images`: whole global batches
        of the epoch's images (train.epoch_images, a budget, takes the first N of each epoch's
        order), or more where train.min_steps asks for more in the run (the epoch then cycles
        the split). The one place the epoch length is computed; BadInput if the split is not one
        batch."""
        t = self.profile.train
        images = train_images if t.epoch_images is None else min(train_images, t.epoch_images)
        if images < t.batch_size:
            raise BadInput(
                f"the train split has {train_images} images, fewer than one batch of "
                f"{t.batch_size} (a smaller batch: -b {max(1, train_images // 2)})"
            )
        return max(images // t.batch_size, -(-t.min_steps // t.epochs))  # ceil

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "run": dataclasses.asdict(self.run)}


PAPER = Profile(
    name="paper",
    description="The text of the NIPS 2012 paper, literally (measured to learn: docs/recipes.md).",
    model=ModelConfig(),
    data=DataConfig(),
    train=TrainConfig(),
)

CUDA_CONVNET = Profile(
    name="cuda-convnet",
    description=(
        "What the 2012 code ran (layers-145.cfg, layer-params-145.cfg, convdata.py; measured to "
        "learn: docs/recipes.md)."
    ),
    model=ModelConfig(
        order="cuda-convnet",
        lrn_alpha=1e-4 / 5,  # the parser divides "scale" by the window size
        spatial_norm=True,
        init_std=_per_layer(0.01, conv3=0.03, conv4=0.03, conv5=0.03),
    ),
    data=DataConfig(lighting="cuda-convnet", crop_chunk=32, mean="center"),
    train=TrainConfig(
        bias_lr_mult=2.0,
        bias_decay=False,
        bias_lr_fixed=True,
        schedule="steps",
        epochs=91,  # stopped at epoch 91 (40.66% / 18.21% validation)
        milestones=(25, 51, 79),
        conv1_lr_schedule=((67, 1e-5), (72, 0.0)),
        lighting_off_epoch=67,
    ),
)

CAFFE = Profile(
    name="caffe",
    description="Caffe's models/bvlc_alexnet.",
    model=ModelConfig(
        input_size=227,
        conv1_pad_right_bottom=0,
        lrn_k=1.0,
        lrn_alpha=1e-4 / 5,  # Caffe divides alpha by local_size
        lrn_across_towers=True,  # norm1/norm2 have no groups: the window spans all 96/256 maps
        dropout_style="inverted",  # Caffe's dropout layer scales the survivors by 1 / (1 - p)
        init_std=_per_layer(0.01, fc6=0.005, fc7=0.005),
        init_bias=_per_layer(0.0, conv2=0.1, conv4=0.1, conv5=0.1, fc6=0.1, fc7=0.1),
    ),
    data=DataConfig(crop_size=227, lighting_std=0.0),
    train=TrainConfig(
        batch_size=256,
        # Caffe's SGD solver keeps the lr inside the velocity, v <- m v + lr (g + wd w),
        # w <- w - v: the paper's update (PaperSGD), not torch.optim.SGD's.
        optimizer="paper-sgd",
        bias_lr_mult=2.0,
        bias_decay=False,
        schedule="steps",
        # lr x0.1 every 100k of 450k iterations at batch 256 on 1.28M images: 20, 40, 60 epochs
        epochs=90,
        milestones=(20, 40, 60, 80),
    ),
)

TORCHVISION = Profile(
    name="torchvision",
    description="torchvision.models.alexnet: single tower 64-192-384-256-256, no LRN.",
    model=ModelConfig(
        layout="torchvision",
        conv1_pad_right_bottom=0,
        lrn=False,
        towers=1,
        dropout_style="inverted",  # torch.nn.Dropout
    ),
    data=DataConfig(lighting_std=0.0, mean="channel-std"),
    # torchvision references/classification for alexnet: SGD lr 0.01, wd 1e-4, batch 32 x 8
    # GPUs, lr x0.1 every 30 epochs, 90 epochs.
    train=TrainConfig(
        optimizer="sgd",
        batch_size=256,
        weight_decay=1e-4,
        schedule="steps",
        milestones=(30, 60),
    ),
)

# The demo recipe: the paper's network on Fashion-MNIST on a 2-core CPU in a quarter of an
# hour: one short epoch, so it changes the recipe where one epoch of 48,000 images asks for it;
# `deviations_from_paper` lists every change in config.json, and the README ("How the recipe
# was chosen") gives the measured runs behind each value. (It was chosen while the `paper`
# profile still used inverted dropout, which kept the paper's init and lr at chance for about
# 300 steps; with the paper's dropout the `paper` recipe learns at once: docs/recipes.md.)
_FAN_IN = {
    "conv1": 3 * 11 * 11, "conv2": 48 * 5 * 5, "conv3": 256 * 3 * 3, "conv4": 192 * 3 * 3,
    "conv5": 192 * 3 * 3, "conv6": 128 * 3 * 3, "fc6": 256 * 6 * 6, "fc7": 4096,
}  # fmt: skip
DEMO = Profile(
    name="demo",
    description="The paper's network with a recipe that learns on a CPU in minutes.",
    model=ModelConfig(
        # He et al. 2015 init, std sqrt(2 / fan_in), keeps activations O(1) through the ReLUs;
        # fc8 keeps the paper's 0.01. Biases 0: with this init, 1s would push the units far
        # from the inputs' scale.
        init_std=_per_layer(0.01, **{k: round((2 / n) ** 0.5, 4) for k, n in _FAN_IN.items()}),
        init_bias=_per_layer(0.0),
        # No dropout: within one epoch nothing overfits, and dropout slows the first descent
        # (README, "How the recipe was chosen").
        dropout=0.0,
    ),
    # Inputs standardised per channel (std 1) instead of the raw 0-255 pixels minus the mean.
    data=DataConfig(mean="channel-std"),
    train=TrainConfig(
        epochs=1,
        epoch_images=48_000,  # 1,500 steps of 32: what fits the demo's 20 minutes on 2 cores
        batch_size=32,  # more updates for the same images (README: better than 64)
        lr=0.02,  # the best of 0.01 / 0.02 / 0.04 (README)
        warmup_epochs=0.05,
        schedule="linear",  # a plateau rule cannot act within one short epoch
    ),
)

# Fine-tuning a trained network (`--init`, usually the demo's) on a folder of a few hundred
# photos. Measured on real photos, 30/100/300 per class, 3 classes (docs/finetune-photos.md):
# the demo's own recipe with --init ran 5 steps on 90 images and ended at chance; these values
# learn at every size. The model and data settings are the demo's, so that its weights load
# and see inputs scaled as they were trained on.
FINETUNE = Profile(
    name="finetune",
    description="Fine-tuning a trained net (--init, e.g. runs/demo) on a small folder of photos.",
    model=DEMO.model,
    data=DEMO.data,
    train=TrainConfig(
        epochs=10,
        # 90 photos make 2 steps of 32: each of the 10 epochs is then 30 steps, 11 passes
        min_steps=300,
        batch_size=32,
        lr=0.002,  # a tenth of the demo's: 0.02 from trained weights diverged (issue 20)
        warmup_epochs=1,  # a tenth of the run: fc8 starts from random
        schedule="linear",  # to 0 at the end, no validation-driven rule on a tiny val split
    ),
)

PROFILES: dict[str, Profile] = {
    p.name: p for p in (PAPER, CUDA_CONVNET, CAFFE, TORCHVISION, DEMO, FINETUNE)
}


def get_profile(name: str) -> Profile:
    """The profile called `name`; a clear error listing the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise BadInput(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}") from None


def replace_checked(config: Any, what: str, **overrides: Any) -> Any:
    """`dataclasses.replace` that names the valid fields when given an unknown one."""
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise BadInput(
            f"unknown {what} override(s) {', '.join(unknown)}; valid: {', '.join(names)}"
        )
    return dataclasses.replace(config, **overrides)


def profile_from_dict(d: dict[str, Any]) -> Profile:
    """Inverse of Profile.to_dict (JSON turns tuples into lists; turn them back)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if isinstance(v, list):
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return Profile(
        name=d["name"],
        description=d.get("description", ""),
        model=build(ModelConfig, d["model"]),
        data=build(DataConfig, d["data"]),
        train=build(TrainConfig, d["train"]),
    )


# --- comparing profiles ------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"lrn": True}} -> {"model.lrn": True}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def profile_diff(profile: Profile | dict[str, Any], base: str = "paper") -> list[tuple]:
    """[(dotted key, the profile's value, the base profile's value)] for every value that
    differs (name and description aside). `profile` may be a Profile or its to_dict() as read
    back from JSON (lists for tuples: compared as JSON)."""
    mine = flatten(profile.to_dict() if isinstance(profile, Profile) else profile)
    ref = flatten(get_profile(base).to_dict())

    def same(a, b) -> bool:
        return json.dumps(a, default=str) == json.dumps(b, default=str)

    return [
        (k, mine[k], ref.get(k, "(absent)"))
        for k in mine
        if k not in ("name", "description") and not same(mine[k], ref.get(k))
    ]


def known_problems(profile: Profile) -> list[str]:
    """What has been measured to go wrong with this combination of values (docs/recipes.md),
    as text; `alexnet train` prints each as a warning and records them in config.json."""
    m = profile.model
    problems = []
    paper_fc = all(m.init_std.get(k) == 0.01 and m.init_bias.get(k) == 1.0 for k in ("fc6", "fc7"))
    # The torchvision layout keeps PyTorch's default init (as torchvision): init_std is unused.
    if m.layout == "two-tower" and m.dropout > 0 and m.dropout_style == "inverted" and paper_fc:
        problems.append(
            "inverted dropout with the paper's fc init (N(0, 0.01), biases 1): with the paper's "
            "net this kept the training loss at chance for 300+ steps on Fashion-MNIST (batch "
            "128, lr 0.01), where the paper's dropout (model.dropout_style=classic) left it at "
            "step 40 (docs/recipes.md)"
        )
    if m.layout == "two-tower" and profile.data.input_scale <= 1 / 255 + 1e-9 and paper_fc:
        problems.append(
            "inputs scaled to [0, 1] with the paper's init: with the paper's net this kept the "
            "training loss at chance for 300+ steps on Fashion-MNIST (batch 128, lr 0.01), where "
            "the paper's 0-255 pixels (data.input_scale=1) left it at step 40 (docs/recipes.md)"
        )
    return problems


def deviations_from_paper(profile: Profile) -> list[str]:
    """Every value of the profile that differs from the paper profile, as text."""
    return [f"{k}: {mine!r} (paper: {paper!r})" for k, mine, paper in profile_diff(profile)]


# Model fields the torchvision layout does not read: it keeps PyTorch's default init (as
# torchvision does), has no LRN and one fixed layer order.
TORCHVISION_UNUSED = ("model.order", "model.lrn_", "model.spatial_norm", "model.init_std.",
                      "model.init_bias.")  # fmt: skip
NOT_READ = "-"


def profile_differences(names: list[str] | None = None) -> list[tuple[str, list[Any]]]:
    """[(dotted key, value per profile)] for every value on which the profiles differ; a value
    the profile's layout does not read is NOT_READ."""
    names = names or list(PROFILES)
    flat = [flatten(get_profile(n).to_dict()) for n in names]
    for n, f in zip(names, flat, strict=True):
        if get_profile(n).model.layout == "torchvision":
            f.update({k: NOT_READ for k in f if k.startswith(TORCHVISION_UNUSED)})
    keys = [k for k in flat[0] if k not in ("name", "description")]
    return [(k, [f[k] for f in flat]) for k in keys if len({repr(f[k]) for f in flat}) > 1]


# --- `--set SECTION.FIELD=VALUE` ---------------------------------------------------------------
def parse_value(text: str, current: Any) -> Any:
    """A --set value, typed like the field's current value (JSON for anything non-scalar)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise BadInput(f"expected true/false, got {text!r}")
    if text.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float) or current is None:
            try:
                return float(text) if "." in text or "e" in text.lower() else int(text)
            except ValueError:
                return float(text) if text.lower() in ("nan", "inf", "-inf") else text
        if isinstance(current, (tuple, list, dict)):
            v = json.loads(text)
            if isinstance(v, list):
                return tuple(tuple(x) if isinstance(x, list) else x for x in v)
            return v
    except (ValueError, json.JSONDecodeError):
        raise BadInput(f"cannot read {text!r} as a {type(current).__name__}") from None
    return text


def apply_overrides(profile: Profile, sets: list[str]) -> Profile:
    """`--set model.dropout=0.3 train.lr=0.02 data.lighting_std=0` onto a profile alone (the
    studies' rows, `summary`): apply_settings' parsing, without the run section."""
    for item in sets:
        if item.partition(".")[0] == "run":
            raise BadInput(f"--set {item!r}: only the profile's model, data and train apply here")
    return apply_settings(profile, RunConfig(), {}, list(sets))[0]


# --- checking values ---------------------------------------------------------------------------
CHOICES = {
    "model.layout": ("two-tower", "torchvision"),
    "model.order": ("paper", "cuda-convnet"),
    "model.activation": ("relu", "tanh"),
    "model.pool": ("overlap", "nonoverlap"),
    "model.towers": (1, 2),
    "model.drop_conv": (3, 4, 5, None),
    "model.dropout_style": ("classic", "inverted"),
    "data.lighting": ("paper", "cuda-convnet"),
    "data.mean": ("image", "center", "channel", "channel-std"),
    "train.optimizer": ("paper-sgd", "sgd"),
    "train.schedule": ("plateau", "steps", "linear"),
}
# (lowest, highest, lowest included, highest included); None: unbounded
RANGES = {
    "model.lrn_size": (1, None, True, True),
    "model.lrn_k": (0, None, True, True),
    "model.lrn_alpha": (0, None, True, True),
    "model.lrn_beta": (0, None, True, True),
    "model.spatial_norm_size": (1, None, True, True),
    "model.spatial_norm_k": (0, None, True, True),
    "model.spatial_norm_alpha": (0, None, True, True),
    "model.spatial_norm_beta": (0, None, True, True),
    "model.dropout": (0, 1, True, False),
    "model.input_size": (63, None, True, True),
    "model.conv1_pad_right_bottom": (0, None, True, True),
    "data.image_size": (1, None, True, True),
    "data.crop_size": (1, None, True, True),
    "data.lighting_std": (0, None, True, True),
    "data.crop_chunk": (1, None, True, True),
    "data.input_scale": (0, None, False, True),
    "train.epochs": (1, None, True, True),
    "train.epoch_images": (1, None, True, True),
    "train.min_steps": (0, None, True, True),
    "train.batch_size": (1, None, True, True),
    "train.lr": (0, None, True, True),
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": (0, None, True, True),
    "train.bias_lr_mult": (0, None, True, True),
    "train.max_lr_drops": (0, None, True, True),
    "train.plateau_patience": (1, None, True, True),
    "train.plateau_threshold": (0, None, True, True),
    "train.plateau_chance_margin": (0, 1, True, True),
    "train.chance_warning_epochs": (0, None, True, True),
    "train.warmup_epochs": (0, None, True, True),
    "train.init_lr_mult": (0, None, True, True),
    "train.freeze_until": (0, None, True, True),
    "train.label_smoothing": (0, 1, True, False),
}


def _check_number(key: str, v: Any) -> None:
    lo, hi, lo_in, hi_in = RANGES[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadInput(f"{key}={v!r} must be a finite number")
    if lo is not None and (v < lo or (v == lo and not lo_in)):
        raise BadInput(f"{key}={v!r} must be {'>=' if lo_in else '>'} {lo}")
    if hi is not None and (v > hi or (v == hi and not hi_in)):
        raise BadInput(f"{key}={v!r} must be {'<=' if hi_in else '<'} {hi}")


def _check_section(flat: dict[str, Any], section: str) -> None:
    for key, valid in CHOICES.items():
        if key.startswith(section) and flat[key] not in valid:
            raise BadInput(f"{key}={flat[key]!r} is not one of {list(valid)}")
    for key in RANGES:
        if key.startswith(section) and flat[key] is not None:  # None: e.g. the whole split
            _check_number(key, flat[key])


def _check_types(config: Any, section: str) -> None:
    """BadInput unless each true/false, integer and number field holds one (a hand-edited
    config.json, or a value --set could not type: 1.5 epochs would fail only at the end)."""
    for f in dataclasses.fields(config):
        v, kind = getattr(config, f.name), str(f.type).replace(" | None", "")
        if v is None and "None" in str(f.type):
            continue
        if kind == "bool" and not isinstance(v, bool):
            raise BadInput(f"{section}.{f.name}={v!r} must be true or false")
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise BadInput(f"{section}.{f.name}={v!r} must be an integer")


# Figure 2's geometry (alexnet.model.CONV_SPEC): conv1 is 11x11 with stride 4 over the input
# padded right and bottom by conv1_pad_right_bottom; conv2-conv5 (and conv6) keep the size; the
# three max-pools have stride 2; fc6 takes the last pooled maps at 6x6.
FC6_SIDE = 6


def pool5_side(model: ModelConfig, size: int) -> int:
    """The side of the two-tower net's last pooled maps for inputs of `size` pixels (0: the
    input is too small to reach them)."""
    z = 3 if model.pool == "overlap" else 2
    side = (size + model.conv1_pad_right_bottom - 11) // 4 + 1
    for _ in range(3):
        if side < z:
            return 0
        side = (side - z) // 2 + 1
    return side


def check_input_size(model: ModelConfig, size: int, what: str = "model.input_size") -> None:
    """BadInput unless the network takes inputs of `size` pixels: the torchvision layout any
    side from 63 (its adaptive pool), the two-tower net a side that gives fc6 its 6x6 maps."""
    name = f"{what} " if what.startswith("-") else f"{what}="  # a flag, or a config field
    if isinstance(size, bool) or not isinstance(size, int) or size < 63:
        raise BadInput(f"{name}{size!r} must be an integer >= 63")
    if model.layout != "two-tower" or pool5_side(model, size) == FC6_SIDE:
        return
    fits = [n for n in range(63, 1024) if pool5_side(model, n) == FC6_SIDE]
    raise BadInput(
        f"{name}{size} gives {pool5_side(model, size)}x{pool5_side(model, size)} maps at pool5 "
        f"where fc6 takes {FC6_SIDE}x{FC6_SIDE}: with conv1_pad_right_bottom="
        f"{model.conv1_pad_right_bottom} and pool={model.pool} the two-tower net takes inputs "
        f"of {fits[0]} to {fits[-1]} pixels"
    )


def check_model_config(model: ModelConfig) -> ModelConfig:
    """The network's values checked (types, choices, ranges, an input size the network takes);
    BadInput naming the field otherwise."""
    _check_types(model, "model")
    _check_section(flatten({"model": dataclasses.asdict(model)}), "model.")
    check_input_size(model, model.input_size)
    return model


# The optimiser applies lr, lr * weight_decay and their multiples as float32 factors: a larger
# value cannot be applied at all (torch: "value cannot be converted to type float").
FLOAT32_MAX = 3.4028234663852886e38


def _epochs(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise BadInput(f"{key}: {v!r} is not an epoch (a finite number >= 0)")
    return v


def _check_schedule(t: TrainConfig) -> None:
    """The epochs and learning rates of the schedule: lists of numbers, finite, in range."""
    example = {"milestones": "[25,51,79]", "conv1_lr_schedule": "[[67,1e-5],[72,0]]"}
    for name in ("milestones", "conv1_lr_schedule"):
        v = getattr(t, name)
        if not isinstance(v, (tuple, list)):
            raise BadInput(
                f"train.{name}={v!r} must be a list, e.g. --set train.{name}={example[name]}"
            )
    for m in t.milestones:
        _epochs("train.milestones", m)
    for pair in t.conv1_lr_schedule:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise BadInput(
                f"train.conv1_lr_schedule: {pair!r} is not an (epoch, lr) pair, e.g. --set "
                f"train.conv1_lr_schedule={example['conv1_lr_schedule']}"
            )
        _epochs("train.conv1_lr_schedule", pair[0])
        _check_number("train.lr", pair[1])
    if t.lighting_off_epoch is not None:
        _epochs("train.lighting_off_epoch", t.lighting_off_epoch)
    # The largest factors the optimiser is given: lr times the bias and --init multipliers,
    # and that times the weight decay.
    lrs = [t.lr] + [lr for _, lr in t.conv1_lr_schedule]
    factor = max(1.0, t.bias_lr_mult) * max(1.0, t.init_lr_mult) * max(1.0, t.weight_decay)
    if max(lrs) * factor > FLOAT32_MAX:
        raise BadInput(
            f"train.lr={max(lrs):g} with bias_lr_mult={t.bias_lr_mult:g}, init_lr_mult="
            f"{t.init_lr_mult:g} and weight_decay={t.weight_decay:g} makes a step factor "
            f"beyond float32's range ({FLOAT32_MAX:.3g}): the optimiser cannot apply it"
        )


def check_profile(profile: Profile) -> Profile:
    """The profile if every value is one the program can run (finite numbers in range, known
    choices, a value per layer for the init); BadInput naming the field otherwise. Called when
    a run's configuration is resolved, before anything is written."""
    for section in ("model", "data", "train"):
        _check_types(getattr(profile, section), section)
    flat = flatten(profile.to_dict())
    for section in ("model.", "data.", "train."):
        _check_section(flat, section)
    _check_schedule(profile.train)
    check_input_size(profile.model, profile.model.input_size)
    crop, size = profile.data.crop_size, profile.model.input_size
    if profile.model.layout == "two-tower" and crop != size:
        raise BadInput(
            f"data.crop_size {crop} differs from model.input_size {size}: the network takes "
            f"the views' {crop}x{crop} crops only at {size}x{size}; set both"
        )
    if profile.model.layout != "two-tower":
        check_input_size(profile.model, crop, "data.crop_size")
    for what in ("init_std", "init_bias"):
        values = getattr(profile.model, what)
        needed = set(LAYERS) | ({"conv6"} if profile.model.conv6 else set())
        if not isinstance(values, dict) or not needed <= set(values) <= needed | set(
            OPTIONAL_LAYERS
        ):
            raise BadInput(
                f"model.{what} must give a value for each of {', '.join(sorted(needed))}"
            )
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadInput(f"model.{what}[{name!r}]={v!r} must be a finite number")
        if what == "init_std" and any(v < 0 for v in values.values()):
            raise BadInput(f"model.init_std must be >= 0, got {values}")
    if profile.data.crop_size > profile.data.image_size:
        raise BadInput(
            f"data.crop_size {profile.data.crop_size} is larger than data.image_size "
            f"{profile.data.image_size}"
        )
    return profile


# (lowest value, may be None) of the RunConfig fields that are numbers
RUN_RANGES = {
    "seed": (0, False),
    "model_parallel": (1, False),
    "workers": (0, True),
    "checkpoint_every": (0, False),
    "log_every": (1, False),
    "max_steps": (0, True),
    "eval_batch_size": (1, False),
    "val_limit": (1, True),
}
CHOICES.update(
    {
        "run.model_parallel": (1, 2),
        "run.decode": ("auto", "cpu", "gpu"),
        "run.init_stats": ("store", "init"),
    }
)


def check_run_config(run: RunConfig) -> RunConfig:
    """The run settings if the program can run them; BadInput naming the field otherwise (the
    profile's values: check_profile)."""
    for name, (lo, may_be_none) in RUN_RANGES.items():
        v = getattr(run, name)
        if v is None and may_be_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BadInput(f"run.{name}={v!r} must be an integer >= {lo}")
    for key in ("run.model_parallel", "run.decode", "run.init_stats"):
        v = getattr(run, key[4:])
        if v not in CHOICES[key]:
            raise BadInput(f"{key}={v!r} must be one of {', '.join(map(str, CHOICES[key]))}")
    for name in ("data", "out", "device"):
        if not isinstance(getattr(run, name), str) or not getattr(run, name):
            raise BadInput(f"run.{name}={getattr(run, name)!r} must be a non-empty string")
    if not isinstance(run.init, str):
        raise BadInput(f"run.init={run.init!r} must be a path (or empty)")
    if not isinstance(run.fast, bool):
        raise BadInput(f"run.fast={run.fast!r} must be true or false")
    if run.compile not in (None, True, False):
        raise BadInput(f"run.compile={run.compile!r} must be true, false or null")
    return run


# --- the settings a command line gives: each flag is an alias of a --set key -------------------
@dataclass(frozen=True)
class Setting:
    """A value of the configuration that has flags of its own: its help, and the flags (the
    first is the name the help and the messages use; the others are aliases, e.g. the
    torchvision reference's spellings where they mean the same). Its type, choices and range
    are the field's (CHOICES, RANGES, RUN_RANGES)."""

    help: str
    flags: tuple[str, ...]
    metavar: str | None = None


SETTINGS: dict[str, Setting] = {
    "run.data": Setting("the prepared store (alexnet prepare)", ("--data", "--data-path"), "STORE"),
    "run.out": Setting("the run folder (created)", ("--out", "--output-dir"), "RUN"),
    "train.epochs": Setting("cycles through the training set (Sec. 5: ~90)", ("--epochs",)),
    "train.batch_size": Setting(
        "the global batch (Sec. 5: 128), split over the ranks and their devices; torchvision's "
        "-b is per GPU, so its -b 32 on 8 GPUs is -b 256 here",
        ("-b", "--batch-size"),
    ),
    "train.lr": Setting("the learning rate (Sec. 5: 0.01)", ("--lr",)),
    "train.momentum": Setting("the momentum (Sec. 5: 0.9)", ("--momentum",)),
    "train.weight_decay": Setting("the weight decay (Sec. 5: 5e-4)", ("--wd", "--weight-decay")),
    "run.seed": Setting(
        "the seed of the initialisation and the views' order (default 0)", ("--seed",)
    ),  # fmt: skip
    "run.device": Setting(
        "cpu, cuda, cuda:1 ... (default auto: cuda if there is one)", ("--device",)
    ),  # fmt: skip
    "run.model_parallel": Setting(
        "2: the paper's two towers on two GPUs (cuda:k and cuda:k+1); with torchrun, each rank "
        "drives 2 GPUs (default 1)",
        ("--model-parallel",),
    ),
    "run.workers": Setting(
        "data loader worker processes (default: from the CPU count)", ("-j", "--workers")
    ),
    "run.decode": Setting(
        "where JPEG records are decoded: the loader workers (cpu), the GPU (nvJPEG), or auto: "
        "the GPU on CUDA when a short measurement at the start finds it faster (default)",
        ("--decode",),
    ),
    "run.fast": Setting(
        "mixed precision and channels_last where measured faster (default); --no-fast: "
        "float32 and the default memory format",
        ("--fast",),
    ),
    "run.compile": Setting(
        "torch.compile the model (default: where measured faster)", ("--compile",)
    ),  # fmt: skip
    "run.checkpoint_every": Setting(
        "also checkpoint every N steps (default 0: at epoch ends only)",
        ("--checkpoint-every",),
        "STEPS",
    ),
    "run.log_every": Setting(
        "a metrics.jsonl, TensorBoard and console line every N steps (default 20)",
        ("--log-every", "--print-freq"),
        "STEPS",
    ),
    "run.max_steps": Setting(
        "stop after this many steps in all (smoke runs); a resumed run goes on to its end "
        "unless given again",
        ("--max-steps",),
        "STEPS",
    ),
    "run.eval_batch_size": Setting("the validation batch (default 256)", ("--eval-batch-size",)),
    "run.val_limit": Setting(
        "validate on N images spread evenly over the split (a class-balanced sample; default all)",
        ("--val-limit",),
        "N",
    ),
    "run.init": Setting(
        "start from these weights (a run folder or a .safetensors file): every tensor whose "
        "name and shape match is loaded bit for bit; fc8 keeps the profile's initialisation "
        "when the class names differ",
        ("--init",),
        "RUN_OR_WEIGHTS",
    ),
    "train.init_lr_mult": Setting(
        "the --init layers' lr is F times the new layers' (default 1: the same)",
        ("--init-lr-mult",),
        "F",
    ),
    "train.freeze_until": Setting(
        "the --init layers keep still (lr 0) until this epoch; 'all': the whole run (default "
        "0: never)",
        ("--freeze-until",),
        "EPOCHS",
    ),
    "run.init_stats": Setting(
        "the mean image and colour statistics of the training store (default, as the paper "
        "fine-tuned with ILSVRC-2012's own mean) or those saved with the --init weights",
        ("--init-stats",),
    ),
}

_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "run": RunConfig,
}


def setting_field(key: str) -> dataclasses.Field:
    """The dataclass field of a dotted key ("train.lr"); BadInput naming the valid ones."""
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise BadInput(
            f"{key!r}: expected SECTION.FIELD with SECTION one of {', '.join(_SECTIONS)} "
            "(see `alexnet profiles`)"
        )
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
    if name not in fields:
        raise BadInput(f"{section} has no field {name!r}; valid: {', '.join(sorted(fields))}")
    return fields[name]


def apply_settings(
    profile: Profile, run: RunConfig, values: dict[str, Any], sets: list[str] = ()
) -> tuple[Profile, RunConfig]:
    """Profile and run settings with `values` ({dotted key: value}, the flags), then `sets`
    (`--set SECTION.FIELD=VALUE`, typed like the field's current value) applied, in that order:
    a --set wins over a flag. `train.freeze_until` may be "all": the run's epochs."""
    items = list(values.items())
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise BadInput(
                f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of "
                f"{', '.join(_SECTIONS)} (see `alexnet profiles`)"
            )
        items.append((key, (item, text)))
    sections: dict[str, Any] = {
        "model": profile.model,
        "data": profile.data,
        "train": profile.train,
        "run": run,
    }
    for key, value in items:
        where = f"--set {value[0]!r}" if isinstance(value, tuple) else key
        try:
            field = setting_field(key)
            section, _, name = key.partition(".")
            if isinstance(value, tuple):
                current = getattr(sections[section], name)
                if current is None and str(field.type).startswith("bool"):
                    current = False  # typed as a true/false (or null, for "not set")
                if "None" in str(field.type) and value[1].lower() in ("none", "null"):
                    value = None
                else:
                    value = parse_value(value[1], current)
        except BadInput as e:
            raise BadInput(f"{where}: {e}") from None
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    if sections["train"].freeze_until == "all":
        t = sections["train"]
        sections["train"] = dataclasses.replace(t, freeze_until=t.epochs)
    run = sections.pop("run")
    return dataclasses.replace(profile, **sections), run
