"""`alexnet train`: the paper's recipe (Sec. 5), resumable bit for bit, observable.

One explicit loop, in the manner of torchvision's references/classification:

    for epoch:                                   # Sec. 5: ~90 cycles through the data
        for batch of the epoch's views:          # Sec. 4.1 views, a function of (seed, epoch, i)
            lr from the schedule; forward; loss; backward; PaperSGD step (Sec. 5)
            every --checkpoint-every steps: checkpoint
        validate (top-1/top-5, centre view); the plateau rule may divide the lr by 10 (Sec. 5)
        checkpoint, metrics.jsonl, TensorBoard, curves.png

What lands in RUN (the --out folder):
    config.json         the fully resolved configuration, written before the first step
    metrics.jsonl       one JSON object per logged step ("kind": "step") and per epoch
    model.safetensors   the latest weights, class names, profile and preprocessing statistics
    state.pt            everything needed to resume: weights, optimiser, schedule, RNG, position
    curves.png          loss and error against epochs, lr drops marked (redrawn every epoch)
    events.out.tfevents.*  TensorBoard
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet import checkpoint
from alexnet.config import (
    PROFILES,
    Profile,
    get_profile,
    profile_from_dict,
    replace_checked,
)
from alexnet.model import build_model
from alexnet.optim import LRSchedule, make_optimizer
from alexnet.speed import FastMode, autocast, default_fast_mode, maybe_compile, prepare_model

RUN_FORMAT = "alexnet-run/1"


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
    fast: bool = True  # mixed precision / channels_last where measured faster (speed.py)
    compile: bool | None = None  # torch.compile (None: as speed.default_fast_mode says)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    log_every: int = 20  # a metrics.jsonl/TensorBoard line every N steps
    # Stop after this many steps in all (tests, smoke runs, the first epochs of a long recipe);
    # a stop at an epoch's last step still validates and checkpoints that epoch.
    max_steps: int | None = None
    eval_batch_size: int = 256
    val_limit: int | None = None  # validate on N images spread over the split (None: all)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_devices(name: str, model_parallel: int = 1) -> list[torch.device]:
    """The devices of one model replica: [d] or, for the paper's two towers, [d, next GPU]."""
    if model_parallel not in (1, 2):
        raise ValueError(
            f"--model-parallel must be 1 or 2 (the paper's two towers), got {model_parallel}"
        )
    dev = resolve_device(name)
    if dev.type != "cuda":
        return [dev] * model_parallel
    first = dev.index if dev.index is not None else 0
    count = torch.cuda.device_count()
    if first + model_parallel > count:
        raise ValueError(
            f"--model-parallel {model_parallel} from cuda:{first} needs {model_parallel} GPUs "
            f"(cuda:{first}..cuda:{first + model_parallel - 1}); this machine has {count}"
        )
    return [torch.device("cuda", first + i) for i in range(model_parallel)]


def _parse_value(text: str, current: Any) -> Any:
    """A --set value, typed like the field's current value (JSON for anything non-scalar)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float) or current is None:
        try:
            return float(text) if "." in text or "e" in text.lower() else int(text)
        except ValueError:
            return text
    if isinstance(current, (tuple, list, dict)):
        v = json.loads(text)
        if isinstance(v, list):
            return tuple(tuple(x) if isinstance(x, list) else x for x in v)
        return v
    return text


def apply_overrides(profile: Profile, sets: list[str]) -> Profile:
    """`--set model.dropout=0.3 train.lr=0.02 data.lighting_std=0` onto the profile."""
    sections = {"model": profile.model, "data": profile.data, "train": profile.train}
    for item in sets:
        key, sep, text = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot or section not in sections:
            raise ValueError(
                f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of model, data, "
                "train (see `alexnet profiles`)"
            )
        config = sections[section]
        names = {f.name for f in dataclasses.fields(config)}
        if field not in names:
            raise ValueError(
                f"--set {item!r}: {section} has no field {field!r}; "
                f"valid: {', '.join(sorted(names))}"
            )
        sections[section] = replace_checked(
            config, section, **{field: _parse_value(text, getattr(config, field))}
        )
    return dataclasses.replace(profile, **sections)


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM: the first asks the loop to checkpoint and stop after the
    current step; a second exits at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: saving a checkpoint after this step (interrupt again to exit at once)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    checkpoint.atomic_write(path, lambda f: f.write(text.encode()))


def weights_metadata(profile: Profile, classes: list[str], extra: dict | None = None) -> dict:
    meta = {
        "format": "alexnet-weights/1",
        "profile": profile.name,
        "config": json.dumps(profile.to_dict()),
        "classes": json.dumps(list(classes)),
    }
    meta.update(extra or {})
    return meta


def preprocess_tensors(stats) -> dict[str, torch.Tensor]:
    """The store's statistics that prediction needs, saved beside the weights."""
    return {
        "preprocess.mean_image": torch.as_tensor(stats.mean_image, dtype=torch.float32),
        "preprocess.channel_mean": torch.as_tensor(stats.channel_mean, dtype=torch.float32),
        "preprocess.channel_std": torch.as_tensor(stats.channel_std, dtype=torch.float32),
        "preprocess.eigval": torch.as_tensor(stats.eigval, dtype=torch.float32),
        "preprocess.eigvec": torch.as_tensor(stats.eigvec, dtype=torch.float32),
    }


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps in all


class Trainer:
    """One training run. `Trainer(profile, run).fit()`; see the module docstring."""

    def __init__(self, profile: Profile, run: RunConfig, *, resume: bool = False, dist=None):
        from alexnet.data import open_store  # the data package is only needed to train

        self.profile, self.run = profile, run
        self.out = Path(run.out)
        self.dist = dist  # alexnet.distributed.Context or None
        self.rank = dist.rank if dist else 0
        self.world = dist.world_size if dist else 1
        self.is_main = self.rank == 0
        # One model replica's devices (two with --model-parallel 2); data and outputs on the first.
        self.devices = dist.devices if dist else model_devices(run.device, run.model_parallel)
        self.device = self.devices[0]
        self.store = open_store(run.data)
        if "train" not in self.store.splits:
            raise ValueError(f"{run.data}: the store has no 'train' split")
        self.num_classes = self.store.num_classes
        t = profile.train
        if t.batch_size % self.world:
            raise ValueError(f"batch size {t.batch_size} does not divide over {self.world} ranks")
        self.local_batch = t.batch_size // self.world  # the global batch is the recipe's

        torch.manual_seed(run.seed)
        model = build_model(profile, num_classes=self.num_classes, devices=self.devices)
        self.mode = self._fast_mode()
        self.model = prepare_model(model, self.mode)  # the plain module: state_dict, eval
        self.optimizer = make_optimizer(self.model, t)
        epoch_images = self.store.size("train")
        if t.epoch_images is not None:  # a budget: the first N images of each epoch's order
            epoch_images = min(epoch_images, t.epoch_images)
        self.steps_per_epoch = epoch_images // t.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the train split has {self.store.size('train')} images, fewer than one batch "
                f"of {t.batch_size}"
            )
        base_epochs = (
            get_profile(profile.name).train.epochs if profile.name in PROFILES else t.epochs
        )
        self.schedule = LRSchedule(
            t,
            self.steps_per_epoch,
            epoch_scale=t.epochs / base_epochs,
            chance_error=1.0 - 1.0 / self.num_classes,  # the plateau rule waits below this
        )
        self.pos = Position()
        self.history: list[dict[str, Any]] = []
        self.train_model = self.model  # what the training step calls: DDP and compiled wrappers
        if dist is not None and self.world > 1:
            self.train_model = dist.wrap(self.model)
            if hasattr(model, "dropout_rows"):  # the global batch's dropout masks (model.py)
                model.dropout_rows = (self.rank * self.local_batch, t.batch_size)
        self.train_model = maybe_compile(self.train_model, self.mode)
        if resume:
            self._load_checkpoint()

    def _fast_mode(self) -> FastMode:
        mode = default_fast_mode(self.device) if self.run.fast else FastMode()
        if self.run.compile is not None:
            mode = dataclasses.replace(mode, compile=self.run.compile)
        return mode

    # --- config and checkpoints ----------------------------------------------------------
    def resolved_config(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "profile": self.profile.to_dict(),
            "run": dataclasses.asdict(self.run),
            "derived": {
                "device": str(self.device),
                "model_devices": [str(d) for d in self.devices],
                "world_size": self.world,
                "per_rank_batch": self.local_batch,
                "steps_per_epoch": self.steps_per_epoch,
                "fast_mode": dataclasses.asdict(self.mode),
                "num_classes": self.num_classes,
                "classes": self.store.classes,
                "store": str(Path(self.run.data).resolve()),
                "torch": torch.__version__,
                "deviations_from_paper": deviations_from_paper(self.profile),
            },
        }

    def _state(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "position": dataclasses.asdict(self.pos),
            "rng": checkpoint.capture_rng_state(),
            "history": json.dumps(self.history),
        }

    def save_checkpoint(self) -> None:
        """state.pt first (the source of truth for --resume), then the exported weights; each
        written atomically, so a kill at any moment leaves the previous complete pair or a
        newer state.pt."""
        if not self.is_main:
            return
        checkpoint.save_state(self.out / "state.pt", self._state())
        tensors = dict(self.model.state_dict())
        tensors.update(preprocess_tensors(self.store.stats))
        meta = weights_metadata(
            self.profile,
            self.store.classes,
            {"step": str(self.pos.step), "epoch": str(self.pos.epoch)},
        )
        checkpoint.save_weights(self.out / "model.safetensors", tensors, meta)

    def _load_checkpoint(self) -> None:
        path = self.out / "state.pt"
        if not path.exists():
            # Killed before its first checkpoint: the run starts over, with its own config.
            if self.is_main:
                print(f"{path}: no checkpoint yet; starting the run over", file=sys.stderr)
                self._truncate_metrics()
            return
        state = checkpoint.load_state(path, map_location="cpu")
        if state.get("format") != RUN_FORMAT:
            raise ValueError(f"{path}: not a checkpoint of this program ({state.get('format')!r})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.pos = Position(**state["position"])
        self.history = json.loads(state["history"])
        checkpoint.restore_rng_state(state["rng"])
        if self.is_main:
            self._truncate_metrics()
            print(
                f"resuming {self.out} at epoch {self.pos.epoch + 1}, batch {self.pos.batch}, "
                f"step {self.pos.step}",
                file=sys.stderr,
            )

    # --- one epoch -----------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int):
        from alexnet.data import make_train_loader

        return make_train_loader(
            self.store,
            self.profile.data,
            batch_size=self.local_batch,
            seed=self.run.seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=self.rank,
            world_size=self.world,
            workers=self.run.workers,
            device=self.device,
            lighting=self.schedule.lighting_on(epoch),
        )

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.mode, self.device):
            out = self.train_model(x)
        # The loss in float32 whatever the autocast dtype (softmax of Sec. 3.5 / cross-entropy).
        return F.cross_entropy(out.float(), y, label_smoothing=self.profile.train.label_smoothing)

    def train_epoch(self, interrupt: Interrupt, bar_factory: Callable) -> str:
        """Runs the rest of the current epoch. Returns "done", "interrupted" or "max_steps"."""
        epoch, spe = self.pos.epoch, self.steps_per_epoch
        loader = self._loader(epoch, self.pos.batch)
        self.train_model.train()
        losses: list[tuple[int, torch.Tensor]] = []
        seen, t0 = 0, time.perf_counter()
        bar = bar_factory(total=spe, initial=self.pos.batch, desc=f"epoch {epoch + 1}")
        status = "done"
        for x, y in loader:
            if self.pos.batch >= spe:
                break
            lr = self.schedule.apply(self.optimizer, epoch + self.pos.batch / spe)
            loss = self._forward_loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append((self.pos.step, loss.detach()))
            self.pos.batch += 1
            self.pos.step += 1
            seen += x.shape[0] * self.world
            if bar is not None:
                bar.update(1)
            log_now = self.pos.step % self.run.log_every == 0 or self.pos.batch == spe
            if log_now or interrupt.requested:
                self._check_finite(losses)
                rate = seen / (time.perf_counter() - t0)
                mean_loss = torch.stack([v for _, v in losses]).float().mean()
                if log_now and self.dist is not None and self.world > 1:
                    # Every rank logs at the same steps: the mean over the global batch.
                    mean_loss = self.dist.all_reduce_sum(mean_loss.detach().cpu()) / self.world
                mean_loss = float(mean_loss)
                self._log_step(mean_loss, lr, rate, bar)
                losses.clear()
            if self.run.checkpoint_every and self.pos.step % self.run.checkpoint_every == 0:
                self._check_finite(losses)
                self.save_checkpoint()
            if interrupt.requested:
                status = "interrupted"
                break
            if self._max_steps_reached() and self.pos.batch < spe:
                # (at the epoch's last batch the epoch ends as usual: validated, then fit stops)
                status = "max_steps"
                break
        self._check_finite(losses)
        if bar is not None:
            bar.close()
        if status == "done":
            self.pos.epoch += 1
            self.pos.batch = 0
        return status

    def _max_steps_reached(self) -> bool:
        return self.run.max_steps is not None and self.pos.step >= self.run.max_steps

    def _check_finite(self, losses: list[tuple[int, torch.Tensor]]) -> None:
        if not losses:
            return
        values = torch.stack([v for _, v in losses]).float().cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step, value = losses[int(bad[0])][0] + 1, float(values[int(bad[0])])
            raise FloatingPointError(
                f"the loss became {value} at step {step} (epoch {self.pos.epoch + 1}); the run "
                f"stopped and {self.out / 'state.pt'} keeps the last good checkpoint"
            )

    def _log_step(self, loss: float, lr: float, rate: float, bar) -> None:
        rec = {
            "kind": "step",
            "step": self.pos.step,
            "epoch": round(self.pos.epoch + self.pos.batch / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "images_per_s": rate,
        }
        if not self.is_main:
            return
        self._append_metrics(rec)
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, self.pos.step)
            self.tb.add_scalar("train/lr", lr, self.pos.step)
            self.tb.add_scalar("train/images_per_s", rate, self.pos.step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}", img_s=f"{rate:.0f}")
        else:
            print(
                f"epoch {rec['epoch']:.3f} step {self.pos.step} loss {loss:.4f} lr {lr:.3g} "
                f"{rate:.1f} img/s",
                flush=True,
            )

    def _truncate_metrics(self) -> None:
        """Drop what was logged after the checkpoint being resumed: it will run again."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return

        def before(r: dict) -> bool:
            if r["kind"] == "epoch":
                return r["epoch"] <= self.pos.epoch  # pos.epoch: epochs completed
            return r["step"] <= self.pos.step

        lines = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if before(json.loads(line))]
        text = "".join(line + "\n" for line in keep)
        checkpoint.atomic_write(path, lambda f: f.write(text.encode()))

    def _append_metrics(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        from alexnet.data import make_eval_loader
        from alexnet.evaluate import evaluate_model

        split = "val" if "val" in self.store.splits else self.store.splits[-1]
        loader = make_eval_loader(
            self.store,
            self.profile.data,
            batch_size=self.run.eval_batch_size,
            views=1,
            split=split,
            workers=self.run.workers,
            device=self.device,
            rank=self.rank,
            world_size=self.world,
            limit=self.run.val_limit,  # N images spread over the split, shared out among the ranks
        )
        return evaluate_model(
            self.model,
            loader,
            views=1,
            mode=self.mode,
            device=self.device,
            dist=self.dist,
            progress=self.is_main and sys.stderr.isatty(),
        )

    def end_epoch(self, train_seconds: float) -> None:
        v = self.validate()
        epoch = self.pos.epoch  # already advanced: epochs completed
        dropped = self.schedule.on_validation(epoch, v["top1_error"])
        step_losses = self._epoch_train_loss(epoch)
        warning = self._chance_warning(epoch, v["top1_error"])
        rec = {
            "kind": "epoch",
            "epoch": epoch,
            "step": self.pos.step,
            "train_loss": step_losses,
            "val_loss": v["loss"],
            "val_top1_error": v["top1_error"],
            "val_top5_error": v["top5_error"],
            "val_images": v["images"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "lr_dropped": dropped,
            "lr_drops": self.schedule.drops,  # every drop so far, for curves.png
            "seconds": train_seconds,
        }
        if warning:
            rec["warning"] = warning
        self.history.append(rec)
        if self.is_main:
            self._append_metrics(rec)
            if self.tb is not None:
                for k in ("val_loss", "val_top1_error", "val_top5_error"):
                    self.tb.add_scalar(f"val/{k[4:]}", rec[k], epoch)
                self.tb.add_scalar("val/at_chance", float(self.schedule.at_chance), epoch)
                if warning:
                    self.tb.add_text("warning", warning, epoch)
            print(
                f"epoch {epoch}: val top-1 error {v['top1_error']:.2%}, "
                f"top-5 {v['top5_error']:.2%}, loss {v['loss']:.4f}"
                + ("  (lr divided by 10)" if dropped else ""),
                flush=True,
            )
            from alexnet.plots import plot_curves

            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")

    def _chance_warning(self, epoch: int, top1_error: float) -> str | None:
        """A loud warning once the net has been at chance for chance_warning_epochs epochs
        (the plateau rule is waiting for it, see optim.LRSchedule); printed on every rank 0
        epoch from then on, and recorded in metrics.jsonl and TensorBoard."""
        t = self.profile.train
        if not self.schedule.at_chance or not t.chance_warning_epochs:
            return None
        if epoch < t.chance_warning_epochs:
            return None
        chance = self.schedule.chance_error
        text = (
            f"the network is still at chance after {epoch} epochs (validation top-1 error "
            f"{top1_error:.2%}, chance {chance:.2%}); the lr is kept, not divided. Its recipe may "
            "not learn on this data at this lr and init (see the README on the paper profile)"
        )
        if self.is_main:
            print(f"WARNING: {text}", file=sys.stderr, flush=True)
        return text

    def _epoch_train_loss(self, epoch: int) -> float | None:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return None
        vals = []
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "step" and epoch - 1 < r["epoch"] <= epoch:
                vals.append(r["loss"])
        return sum(vals) / len(vals) if vals else None

    # --- the run -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.tb = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_json(self.out / "config.json", self.resolved_config())
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out))
            except ImportError:  # tensorboard is a dependency, but training never needs it
                self.tb = None
        bars = self.is_main and sys.stderr.isatty()

        def bar_factory(**kw):
            if not bars:
                return None
            from tqdm import tqdm

            return tqdm(unit="step", dynamic_ncols=True, **kw)

        status = "done"
        try:
            with Interrupt() as interrupt:
                while self.pos.epoch < self.profile.train.epochs:
                    if self._max_steps_reached():  # a resumed run already at its step limit
                        status = "max_steps"
                        break
                    t0 = time.perf_counter()
                    status = self.train_epoch(interrupt, bar_factory)
                    if status == "done":
                        self.end_epoch(time.perf_counter() - t0)
                        self.save_checkpoint()
                        if interrupt.requested:
                            status = "interrupted"
                        elif self._max_steps_reached():
                            status = "max_steps"
                    else:
                        self.save_checkpoint()
                    if status != "done":
                        break
        finally:
            if self.tb is not None:
                self.tb.close()
        result = {"status": status, "position": dataclasses.asdict(self.pos)}
        if self.history:
            result["last_epoch"] = self.history[-1]
        return result


def deviations_from_paper(profile: Profile) -> list[str]:
    """Every value of the profile that differs from the paper profile, as text."""
    from alexnet.summary import _flatten

    paper = _flatten(dataclasses.asdict(PROFILES["paper"]))
    mine = _flatten(dataclasses.asdict(profile))
    return [
        f"{k}: {mine[k]!r} (paper: {paper.get(k)!r})"
        for k in mine
        if k not in ("name", "description") and mine[k] != paper.get(k)
    ]


# --- the command ---------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a prepared store (alexnet prepare)")
    p.add_argument("--out", help="the run folder (created)")
    p.add_argument(
        "--profile", default=None, help=f"recipe: one of {', '.join(PROFILES)} (default paper)"
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the global batch (split over ranks)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue RUN (or --out) from its last checkpoint, exactly",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any profile value, e.g. --set model.lrn=false --set data.lighting_std=0",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--model-parallel",
        type=int,
        choices=(1, 2),
        default=None,
        metavar="{1,2}",
        help="2: the paper's two towers on two GPUs (cuda:k and cuda:k+1); with torchrun, each "
        "rank drives 2 GPUs (default 1)",
    )
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--no-fast", action="store_true", help="float32 and default memory format")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS")
    p.add_argument("--log-every", type=int, default=20, metavar="STEPS")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument(
        "--val-limit",
        type=int,
        help="validate on N images spread evenly over the split (a class-balanced sample)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data parallel under torchrun (the same as launching with torchrun)",
    )


def config_from_args(args) -> tuple[Profile, RunConfig, bool]:
    """The resolved (profile, run) for `alexnet train` arguments; on --resume, the run's own
    config.json, with only the run settings that may change (device, workers) taken from flags."""
    resume = args.resume
    if resume:
        out = Path(resume if isinstance(resume, str) else (args.out or ""))
        if not str(out):
            raise ValueError("--resume needs the run folder: --resume RUN or --out RUN")
        cfg_path = out / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: not a run folder (no config.json)")
        saved = json.loads(cfg_path.read_text())
        if saved.get("format") != RUN_FORMAT:
            raise ValueError(f"{cfg_path}: not a run of this program")
        profile = profile_from_dict(saved["profile"])
        run = RunConfig(**saved["run"])
        mp = getattr(args, "model_parallel", None)
        if mp is not None and mp != run.model_parallel:
            raise ValueError(
                f"{out} was trained with --model-parallel {run.model_parallel}; its optimiser "
                f"state is laid out for that and it resumes only with the same (got {mp})"
            )
        # --max-steps belongs to one invocation, not to the run: a resumed run goes on to its end.
        changes = {"out": str(out), "max_steps": args.max_steps}
        for flag, field in (("device", "device"), ("workers", "workers")):
            v = getattr(args, flag)
            if v is not None and v != "auto":
                changes[field] = v
        if args.epochs is not None:  # extend a finished run
            profile = dataclasses.replace(
                profile, train=dataclasses.replace(profile.train, epochs=args.epochs)
            )
        return profile, dataclasses.replace(run, **changes), True
    if not args.data or not args.out:
        raise ValueError("--data STORE and --out RUN are required (or --resume RUN)")
    profile = get_profile(args.profile or "paper")
    train_over = {}
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
        v = getattr(args, flag)
        if v is not None:
            train_over[field] = v
    profile = dataclasses.replace(
        profile, train=replace_checked(profile.train, "train", **train_over)
    )
    profile = apply_overrides(profile, args.set)
    if args.val_limit is not None and args.val_limit < 1:  # before an epoch, not after it
        raise ValueError(f"--val-limit must be at least 1, got {args.val_limit}")
    out = Path(args.out)
    if (out / "state.pt").exists() or (out / "config.json").exists():
        raise FileExistsError(
            f"{out} already holds a run; continue it with --resume {out}, or choose another --out"
        )
    run = RunConfig(
        data=args.data,
        out=str(out),
        seed=args.seed,
        device=args.device,
        model_parallel=args.model_parallel or 1,
        workers=args.workers,
        fast=not args.no_fast,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        max_steps=args.max_steps,
        val_limit=args.val_limit,
    )
    return profile, run, False


def elastic_restart() -> bool:
    """True in workers that torchrun started again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def cmd_train(args) -> int:
    from alexnet import distributed

    if (
        not args.resume
        and elastic_restart()
        and args.out
        and (Path(args.out) / "state.pt").exists()
    ):
        # torchrun restarted the workers after a failure (--max-restarts): continue the run.
        args.resume = args.out
    profile, run, resume = config_from_args(args)
    with distributed.context(
        run.device, requested=args.distributed, model_parallel=run.model_parallel
    ) as dist:
        trainer = Trainer(profile, run, resume=resume, dist=dist)
        try:
            result = trainer.fit()
        except FloatingPointError as e:
            print(f"alexnet train: {e}", file=sys.stderr)
            return 3
    if trainer.is_main:
        status = result["status"]
        where = f"{run.out}/model.safetensors"
        if status == "interrupted":
            print(f"interrupted; checkpoint saved. Continue with: alexnet train --resume {run.out}")
            return 130
        last = result.get("last_epoch")
        if last:
            print(
                f"done: val top-1 error {last['val_top1_error']:.2%}, top-5 "
                f"{last['val_top5_error']:.2%}; weights {where}; curves {run.out}/curves.png"
            )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network on a prepared store (the paper's recipe by default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
