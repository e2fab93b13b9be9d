"""Training: the paper's recipe (Sec. 5), resumable bit for bit, observable.

One explicit loop, in the manner of torchvision's references/classification:

    fit:
        for epoch:                               # Sec. 5: ~90 cycles through the data
            train_one_epoch                      # Sec. 4.1 views, a function of (seed, epoch, i);
                                                 # lr from the schedule; forward; loss; backward;
                                                 # PaperSGD step (Sec. 5); checkpoints on request
            evaluate                             # top-1/top-5, centre view
            the plateau rule may divide the lr by 10 (Sec. 5)
            checkpoint, metrics.jsonl, TensorBoard, curves.png (alexnet.runlog)

What lands in RUN (the --out folder):
    config.json         the fully resolved configuration, written before the first step
    metrics.jsonl       one JSON object per logged step ("kind": "step") and per epoch
    model.safetensors   the latest weights, class names, profile and preprocessing statistics
    state.pt            everything needed to resume: weights, optimiser, schedule, RNG, position
    curves.png          loss and error against epochs, lr drops marked (redrawn every epoch)
    events.out.tfevents.*  TensorBoard

The checkpoint, RNG and DDP details lie below the loop, in alexnet.trainstate; the run folder
(lock, resume or start) in alexnet.runfolder; the configuration in alexnet.config (RunSpec).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet import fast, lrn_pool, trainstate
from alexnet.config import (
    Profile,
    RunConfig,
    RunSpec,
    check_run_config,
    deviations_from_paper,
    known_problems,
)
from alexnet.data import TrainLoader, make_eval_loader, open_store
from alexnet.devices import model_devices, select_device
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_model
from alexnet.fileio import exclusive_lock, write_json
from alexnet.model import AlexNet, build_model
from alexnet.optim import LRSchedule, make_optimizer
from alexnet.runfolder import RUN_FORMAT
from alexnet.runlog import RunLog
from alexnet.speed import (
    FastMode,
    autocast,
    configure_backends,
    default_fast_mode,
    maybe_compile,
    prepare_model,
)
from alexnet.trainstate import Interrupt, Position

__all__ = ["RUN_FORMAT", "RunConfig", "RunSpec", "Trainer", "check_run_config", "Position"]


class Trainer:
    """One training run: `Trainer(spec).fit()`, or `Trainer(profile, run)` (checked here then);
    see the module docstring."""

    def __init__(
        self,
        spec: RunSpec | Profile,
        run: RunConfig | None = None,
        *,
        resume: bool = False,
        dist=None,
    ):
        self.spec = spec if isinstance(spec, RunSpec) else RunSpec.checked(spec, run)
        self.profile, self.run = profile, run = self.spec.profile, self.spec.run
        self.out = Path(run.out)
        self.dist = dist  # alexnet.distributed.Context or None
        self.rank = dist.rank if dist else 0
        self.world = dist.world_size if dist else 1
        self.is_main = self.rank == 0
        # One model replica's devices (two with --model-parallel 2); data and outputs on the first.
        self.devices = dist.devices if dist else model_devices(run.device, run.model_parallel)
        self.device = self.devices[0]
        select_device(self.device)  # cuda:1 alone, no context on cuda:0
        configure_backends(self.device)
        self.store = open_store(run.data)
        if "train" not in self.store.splits:
            raise BadInput(f"{run.data}: the store has no 'train' split")
        self.num_classes = self.store.num_classes
        t = profile.train
        if t.batch_size % self.world:
            raise BadInput(f"batch size {t.batch_size} does not divide over {self.world} ranks")
        self.local_batch = t.batch_size // self.world  # the global batch is the recipe's
        self.steps_per_epoch = self.spec.steps_per_epoch(self.store.size("train"))

        torch.manual_seed(run.seed)
        model = build_model(profile, num_classes=self.num_classes, devices=self.devices)
        self.stats = self.store.stats  # what the views subtract and scale by
        self.init_report = trainstate.init_weights(self, model, resume) if run.init else None
        loaded = self.init_report["loaded"] if self.init_report else ()
        self.mode = self._fast_mode()
        self.model = prepare_model(model, self.mode)  # the plain module: state_dict, eval
        self.optimizer = make_optimizer(self.model, t, loaded=loaded)
        self.schedule = LRSchedule(
            t,
            self.steps_per_epoch,
            epoch_scale=self.spec.epoch_scale,
            chance_error=1.0 - 1.0 / self.num_classes,  # the plateau rule waits below this
        )
        self.pos = Position()
        self.history: list[dict[str, Any]] = []
        self.log = RunLog(self.out, main=self.is_main, num_classes=self.num_classes)
        self.train_model = self.model  # what the training step calls: DDP and compiled wrappers
        if self.ddp:
            self.train_model = dist.wrap(self.model)
            if isinstance(model, AlexNet):  # the global batch's dropout masks (model.py)
                model.dropout_rows = (self.rank * self.local_batch, t.batch_size)
        self.train_model = maybe_compile(self.train_model, self.mode)
        # One set of loader workers for the whole run (and one for validation), not per epoch.
        self.train_loader = TrainLoader(
            self.store,
            profile.data,
            batch_size=self.local_batch,
            seed=run.seed,
            rank=self.rank,
            world_size=self.world,
            workers=run.workers,
            device=self.device,
            decode=run.decode,
            stats=self.stats,
            epoch_batches=self.steps_per_epoch,
        )
        self._val_loader = None
        if resume or self.world > 1:  # DDP: every rank takes part (rank 0's `resume` decides)
            trainstate.load(self, resume)

    def _fast_mode(self) -> FastMode:
        mode = default_fast_mode(self.device) if self.run.fast else FastMode()
        if self.run.compile is not None:
            mode = dataclasses.replace(mode, compile=self.run.compile)
        return mode

    @property
    def ddp(self) -> bool:
        return self.dist is not None and self.world > 1

    # --- the run -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the recipe (or run.max_steps, or an interrupt). Rank 0 holds the
        run folder's lock meanwhile (re-entrant: `alexnet train` holds it for its whole life)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.out) if self.is_main else contextlib.nullcontext():
            if self.is_main:
                write_json(self.out / "config.json", self.resolved_config())
                for problem in known_problems(self.profile):
                    print(f"warning: {problem}", file=sys.stderr)
                self.log.header(self.describe())
            self.log.open(self.pos.step)
            try:
                with Interrupt() as interrupt:
                    status = self._epochs(interrupt)
            finally:
                self.log.close()
                self.close_loaders()
        result = {"status": status, "position": dataclasses.asdict(self.pos)}
        if self.history:
            result["last_epoch"] = self.history[-1]
            warning = self.ended_at_chance() if status == "done" else None
            if warning:
                result["warning"] = warning
                if self.is_main:
                    print(f"warning: {warning}", file=sys.stderr)
        return result

    def ended_at_chance(self) -> str | None:
        """A finished run whose last validation is still within plateau_chance_margin of
        chance (1 - 1/classes) has learnt nothing a user can use: said at the end, loudly."""
        err, chance = self.history[-1]["val_top1_error"], 1.0 - 1.0 / self.num_classes
        if err < chance - self.profile.train.plateau_chance_margin:
            return None
        hint = (
            "fine-tuning on a small folder: --profile finetune (at least 300 steps, lr 0.002, "
            "warm-up; README, 'Your own photos')"
            if self.run.init
            else "a lower --lr, more --epochs, or --init from a trained run with --profile finetune"
        )
        return (
            f"the run ended at chance: validation top-1 error {err:.2%} after "
            f"{self.pos.step:,} steps, chance {chance:.2%}; this network has learnt nothing "
            f"usable. Try {hint}"
        )

    def _epochs(self, interrupt: Interrupt) -> str:
        """The epochs left: "done", "interrupted" or "max_steps"."""
        while self.pos.epoch < self.profile.train.epochs:
            if self._max_steps_reached():  # a resumed run already at its step limit
                return "max_steps"
            t0 = time.perf_counter()
            status = self.train_one_epoch(interrupt)
            if status == "done":
                self.record_epoch(self.evaluate(), time.perf_counter() - t0)
            self.save_checkpoint()
            asked = self.dist.any(interrupt.requested) if self.ddp else interrupt.requested
            if status == "done" and asked:  # during validation
                return "interrupted"
            if status == "done" and self._max_steps_reached():
                return "max_steps"
            if status != "done":
                return status
        return "done"

    def train_one_epoch(self, interrupt: Interrupt) -> str:
        """Runs the rest of the current epoch. Returns "done", "interrupted" or "max_steps"."""
        epoch, spe = self.pos.epoch, self.steps_per_epoch
        self.train_model.train()
        losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last log line
        seen, t0, status = 0, time.perf_counter(), "done"
        bar = self.log.bar(total=spe, initial=self.pos.batch, desc=f"epoch {epoch + 1}")
        lighting = self.schedule.lighting_on(epoch)
        for x, y in self.train_loader.epoch(epoch, self.pos.batch, lighting=lighting):
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
            at_max_steps = self._max_steps_reached() and self.pos.batch < spe
            # Step 1 too: a log file (or a pipe) shows at once that the run is training and
            # its first loss (about ln(classes)), not only after log_every steps. Deterministic
            # (the run's step 1, not this process's first), so a resumed run logs as the
            # uninterrupted one. And the last step before --max-steps stops the run, as an
            # interrupt does: its steps since the last line were not logged at all.
            log_now = (
                self.pos.step % self.run.log_every == 0
                or self.pos.batch == spe
                or self.pos.step == 1
                or at_max_steps
            )
            stop = self._stop_requested(interrupt, log_now)
            if log_now or stop:
                rate = seen / (time.perf_counter() - t0)
                self._log_losses(losses, lr, rate, bar, all_ranks=log_now)
            if self.run.checkpoint_every and self.pos.step % self.run.checkpoint_every == 0:
                trainstate.check_finite_losses(self, losses)
                self.save_checkpoint()
            if stop:
                status = "interrupted"
                break
            if at_max_steps:
                # (at the epoch's last batch the epoch ends as usual: validated, then fit stops)
                status = "max_steps"
                break
        trainstate.check_finite_losses(self, losses)
        if bar is not None:
            bar.close()
        if status == "done":
            self.pos.epoch += 1
            self.pos.batch = 0
        return status

    def evaluate(self) -> dict[str, float]:
        """Validation: top-1/top-5 error and loss on the centre view (Sec. 6's one-view test)."""
        if self._val_loader is None:  # made once: its workers serve every epoch's validation
            split = "val" if "val" in self.store.splits else self.store.splits[-1]
            self._val_loader = make_eval_loader(
                self.store,
                self.profile.data,
                batch_size=self.run.eval_batch_size,
                views=1,
                split=split,
                workers=self.run.workers,
                device=self.device,
                rank=self.rank,
                world_size=self.world,
                limit=self.run.val_limit,  # N images spread over the split, shared by the ranks
                decode=self.train_loader.decode,
                stats=self.stats,
            )
        return evaluate_model(
            self.model,
            self._val_loader,
            views=1,
            mode=self.mode,
            device=self.device,
            dist=self.dist,
            progress=self.log.bars,
        )

    def record_epoch(self, v: dict[str, float], train_seconds: float) -> None:
        """The plateau rule (Sec. 5) on the epoch's validation, and its metrics line."""
        epoch = self.pos.epoch  # already advanced: epochs completed
        dropped = self.schedule.on_validation(epoch, v["top1_error"])
        rec = {
            "kind": "epoch",
            "epoch": epoch,
            "step": self.pos.step,
            "train_loss": self.log.epoch_train_loss(epoch) if self.is_main else None,
            "val_loss": v["loss"],
            "val_top1_error": v["top1_error"],
            "val_top5_error": v["top5_error"],
            "val_images": v["images"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "lr_dropped": dropped,
            "lr_drops": self.schedule.drops,  # every drop so far, for curves.png
            "seconds": train_seconds,
        }
        warning = self._chance_warning(epoch, v["top1_error"])
        if warning:
            rec["warning"] = warning
        self.history.append(rec)
        self.log.epoch(rec, self.schedule.at_chance)

    def save_checkpoint(self) -> None:
        """state.pt, then model.safetensors (alexnet.trainstate.save)."""
        trainstate.save(self)

    def close_loaders(self) -> None:
        """Stop the loader workers (a later epoch or validation starts them again)."""
        self.train_loader.close()
        if self._val_loader is not None:
            self._val_loader.close()

    # --- the pieces of a step ----------------------------------------------------------------
    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.mode, self.device):
            out = self.train_model(x)
        # The loss in float32 whatever the autocast dtype (softmax of Sec. 3.5 / cross-entropy).
        return F.cross_entropy(out.float(), y, label_smoothing=self.profile.train.label_smoothing)

    def _log_losses(self, losses, lr: float, rate: float, bar, all_ranks: bool) -> None:
        """A metrics line with the mean loss since the last one: over the global batch when
        every rank logs at this step (`all_ranks`), else this rank's (an interrupt)."""
        trainstate.check_finite_losses(self, losses)
        mean_loss = torch.stack([v for _, v in losses]).float().mean()
        if all_ranks and self.ddp:
            mean_loss = self.dist.all_reduce_sum(mean_loss.detach().cpu()) / self.world
        rec = {
            "kind": "step",
            "step": self.pos.step,
            "epoch": round(self.pos.epoch + self.pos.batch / self.steps_per_epoch, 4),
            "loss": float(mean_loss),
            "steps": len(losses),  # the steps this mean is over (step 1 is logged alone)
            "lr": lr,
            "images_per_s": rate,
        }
        self.log.step(rec, bar)
        losses.clear()

    def _max_steps_reached(self) -> bool:
        return self.run.max_steps is not None and self.pos.step >= self.run.max_steps

    def _stop_requested(self, interrupt: Interrupt, log_now: bool) -> bool:
        """Whether to checkpoint and stop after this step. In one process: as soon as asked.
        Under DDP a signal may reach the ranks at different steps, and a rank that stopped
        alone would leave the others waiting in an all-reduce until the timeout: the ranks
        agree (any rank asked) at each step where they all log."""
        if not self.ddp:
            return interrupt.requested
        return log_now and self.dist.any(interrupt.requested)

    def _chance_warning(self, epoch: int, top1_error: float) -> str | None:
        """A loud warning once the net has been at chance for chance_warning_epochs epochs (the
        plateau rule is waiting for it, optim.LRSchedule), on every epoch from then on."""
        t = self.profile.train
        if not self.schedule.at_chance or not t.chance_warning_epochs:
            return None
        if epoch < t.chance_warning_epochs:
            return None
        return (
            f"the network is still at chance after {epoch} epochs (validation top-1 error "
            f"{top1_error:.2%}, chance {self.schedule.chance_error:.2%}); the lr is kept, not "
            "divided. Its recipe may not learn on this data at this lr and init (see the "
            "README on the paper profile)"
        )

    def describe(self) -> str:
        """The header line of the run's output: what runs, where, on what, from where."""
        t, run = self.profile.train, self.run
        split = "val" if "val" in self.store.splits else self.store.splits[-1]
        val = self.store.size(split)
        val = min(val, run.val_limit) if run.val_limit else val
        batch = f"batch {t.batch_size}" + (f" ({self.world} ranks)" if self.world > 1 else "")
        devices = "+".join(str(d) for d in self.devices)
        text = (
            f"train: profile {self.profile.name}, store {run.data} ({self.num_classes} classes; "
            f"{self.store.size('train'):,} train images, {val:,} {split}), {batch}, "
            f"{self.steps_per_epoch:,} steps per epoch, {t.epochs:g} epochs, on {devices} "
            f"{self.mode.label}, run {self.out}"
        )
        if self.pos.step:
            text += f", resuming at step {self.pos.step:,} (epoch {self.pos.epoch + 1})"
        if run.max_steps is not None:
            text += f", stopping at step {run.max_steps:,} (--max-steps)"
        return text

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
                "decode": self.train_loader.decode,
                "num_classes": self.num_classes,
                "classes": self.store.classes,
                "store": str(Path(self.run.data).resolve()),
                "torch": torch.__version__,
                "deviations_from_paper": deviations_from_paper(self.profile),
                "known_problems": known_problems(self.profile),
                "init": self.init_report,  # fine-tuning: what was loaded from --init, if any
                "epoch_scale": self.spec.epoch_scale,
                "lrn": self._lrn_implementation(),
            },
        }

    def _lrn_implementation(self) -> str:
        """Which LRN ran (Sec. 3.3): the fused ReLU-LRN-pool kernel on the CPU, or the layers
        one by one (the same function; speed.prepare_model chooses, lrn_pool may be unbuilt)."""
        if not self.profile.model.lrn:
            return "none"
        if fast.is_fused(self.model) and self.device.type == "cpu" and lrn_pool.available():
            return "fused kernel alexnet::lrn_max_pool"
        return "plain layers (alexnet.lrn)"
