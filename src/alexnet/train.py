"""Training: the paper's recipe (Sec. 5), resumable bit for bit, observable.

One explicit loop, in the manner of torchvision's references/classification:

    for epoch:                                   # Sec. 5: ~90 cycles through the data
        for batch of the epoch's views:          # Sec. 4.1 views, a function of (seed, epoch, i)
            lr from the schedule; forward; loss; backward; PaperSGD step (Sec. 5)
            every --checkpoint-every steps: checkpoint
        validate (top-1/top-5, centre view); the plateau rule may divide the lr by 10 (Sec. 5)
        checkpoint, metrics.jsonl, TensorBoard, curves.png (alexnet.runlog)

What lands in RUN (the --out folder):
    config.json         the fully resolved configuration, written before the first step
    metrics.jsonl       one JSON object per logged step ("kind": "step") and per epoch
    model.safetensors   the latest weights, class names, profile and preprocessing statistics
    state.pt            everything needed to resume: weights, optimiser, schedule, RNG, position
    curves.png          loss and error against epochs, lr drops marked (redrawn every epoch)
    events.out.tfevents.*  TensorBoard

Why one file of this length: the Trainer's parts (set-up, the loop, validation,
checkpoints, resume) share one run's state; the loop itself (`train_epoch`) fits on a screen,
and what a run shows and records lives in runlog.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet import checkpoint
from alexnet.config import (
    PROFILES,
    Profile,
    check_profile,
    deviations_from_paper,
    get_profile,
    known_problems,
    profile_from_dict,
)
from alexnet.data import TrainLoader, make_eval_loader, open_store
from alexnet.devices import model_devices, select_device
from alexnet.errors import AlreadyExists, BadInput, NotFound
from alexnet.evaluate import evaluate_model, same_classes
from alexnet.fileio import exclusive_lock, read_json, write_json
from alexnet.model import AlexNet, build_model
from alexnet.optim import LRSchedule, make_optimizer
from alexnet.runlog import RunLog
from alexnet.speed import (
    FastMode,
    autocast,
    configure_backends,
    default_fast_mode,
    maybe_compile,
    prepare_model,
)

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


# (lowest value, may be None) of the RunConfig fields that are numbers
_RUN_RANGES = {
    "seed": (0, False),
    "model_parallel": (1, False),
    "workers": (0, True),
    "checkpoint_every": (0, False),
    "log_every": (1, False),
    "max_steps": (0, True),
    "eval_batch_size": (1, False),
    "val_limit": (1, True),
}


def check_run_config(run: RunConfig) -> RunConfig:
    """The run settings if the program can run them; BadInput naming the field otherwise (the
    profile's values: config.check_profile)."""
    for name, (lo, may_be_none) in _RUN_RANGES.items():
        v = getattr(run, name)
        if v is None and may_be_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BadInput(f"run.{name}={v!r} must be an integer >= {lo}")
    if run.model_parallel not in (1, 2):
        raise BadInput(f"run.model_parallel={run.model_parallel!r} must be 1 or 2")
    for name in ("data", "out", "device"):
        if not isinstance(getattr(run, name), str) or not getattr(run, name):
            raise BadInput(f"run.{name}={getattr(run, name)!r} must be a non-empty string")
    for name in ("fast",):
        if not isinstance(getattr(run, name), bool):
            raise BadInput(f"run.{name}={getattr(run, name)!r} must be true or false")
    if run.compile not in (None, True, False):
        raise BadInput(f"run.compile={run.compile!r} must be true, false or null")
    return run


def read_run_config(out: str | Path) -> tuple[Profile, RunConfig]:
    """The (profile, run settings) a run folder's config.json records, checked."""
    path = Path(out) / "config.json"
    if not path.exists():
        raise NotFound(f"{path}: not a run folder (no config.json)")
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != RUN_FORMAT:
            raise BadInput(f"{path}: not a run of this program")
        profile, run = profile_from_dict(saved["profile"]), RunConfig(**saved["run"])
        # A store given as a relative path is the one config.json records in full (resolved
        # where the run started), whatever the working directory of the resume.
        store = (saved.get("derived") or {}).get("store")
        if isinstance(run.data, str) and not Path(run.data).is_absolute() and store:
            run = dataclasses.replace(run, data=str(store))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        raise BadInput(f"{path}: empty, incomplete or corrupt run configuration") from None
    try:
        return check_profile(profile), check_run_config(run)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None


def _as_json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def run_not_started(out: str | Path, profile: Profile, run: RunConfig) -> bool:
    """Whether a new run (profile, run) may use the folder `out`: False if it holds nothing of
    a run, True if it holds a run that never reached its first checkpoint and that the same
    command line started (config.json, no state.pt: a run killed early, or a torchrun restart
    before the first checkpoint), which then starts over. AlreadyExists for anything else."""
    out = Path(out)
    if not (out / "state.pt").exists():
        if not (out / "config.json").exists():
            return False
        saved = read_json(out / "config.json")
        mine = {"profile": profile.to_dict(), "run": dataclasses.asdict(run)}
        if isinstance(saved, dict) and all(_as_json(mine[k]) == saved.get(k) for k in mine):
            return True
    raise AlreadyExists(
        f"{out} already holds a run; continue it with --resume {out}, or choose another --out"
    )


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


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps in all


class Trainer:
    """One training run. `Trainer(profile, run).fit()`; see the module docstring."""

    def __init__(self, profile: Profile, run: RunConfig, *, resume: bool = False, dist=None):
        self.profile, self.run = check_profile(profile), check_run_config(run)
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

        torch.manual_seed(run.seed)
        model = build_model(profile, num_classes=self.num_classes, devices=self.devices)
        self.stats = self.store.stats  # what the views subtract and scale by
        self.init_report = self._init_weights(model, resume) if run.init else None
        loaded = self.init_report["loaded"] if self.init_report else ()
        self.mode = self._fast_mode()
        self.model = prepare_model(model, self.mode)  # the plain module: state_dict, eval
        self.optimizer = make_optimizer(self.model, t, loaded=loaded)
        epoch_images = self.store.size("train")
        if t.epoch_images is not None:  # a budget: the first N images of each epoch's order
            epoch_images = min(epoch_images, t.epoch_images)
        self.steps_per_epoch = epoch_images // t.batch_size
        if self.steps_per_epoch < 1:
            raise BadInput(
                f"the train split has {self.store.size('train')} images, fewer than one batch "
                f"of {t.batch_size}"
            )
        # A named profile's schedule is laid out for its own length; --epochs stretches it.
        base = get_profile(profile.name).train.epochs if profile.name in PROFILES else t.epochs
        self.schedule = LRSchedule(
            t,
            self.steps_per_epoch,
            epoch_scale=t.epochs / base,
            chance_error=1.0 - 1.0 / self.num_classes,  # the plateau rule waits below this
        )
        self.pos = Position()
        self.history: list[dict[str, Any]] = []
        self.log = RunLog(self.out, main=self.is_main)
        self.train_model = self.model  # what the training step calls: DDP and compiled wrappers
        if dist is not None and self.world > 1:
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
        )
        self._val_loader = None
        if resume or self.world > 1:  # DDP: every rank takes part (rank 0's `resume` decides)
            self._load_checkpoint(resume)

    def _init_weights(self, model, resume: bool) -> dict[str, Any]:
        """Fine-tuning's start: the --init weights where they fit (checkpoint.init_from). A
        resumed run takes its weights from its checkpoint and what was loaded from its
        config.json, so the --init file need not be there any more."""
        run = self.run
        if run.init_stats not in ("store", "init"):
            raise BadInput(f"init_stats must be 'store' or 'init', got {run.init_stats!r}")
        own = self.out / "model.safetensors"
        if resume and (self.out / "state.pt").exists():
            report = json.loads((self.out / "config.json").read_text())["derived"]["init"]
            stats_from = own
        else:
            source = Path(run.init)
            source = source / "model.safetensors" if source.is_dir() else source
            if not source.exists():
                raise NotFound(f"--init {run.init}: no such weights file or run folder")
            report = checkpoint.init_from(model, source, self.store.classes)
            stats_from = source
        if run.init_stats == "init":
            _, self.stats = checkpoint.split_weights(
                stats_from, checkpoint.load_weights(stats_from)[0]
            )
            if self.stats.mean_image.shape[0] != self.store.image_size:
                raise BadInput(
                    f"--init-stats init: {stats_from} holds the statistics of "
                    f"{self.stats.mean_image.shape[0]}-pixel images, the store "
                    f"{self.store.image_size}"
                )
        report["stats"] = run.init_stats
        return report

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
                "decode": self.train_loader.decode,
                "num_classes": self.num_classes,
                "classes": self.store.classes,
                "store": str(Path(self.run.data).resolve()),
                "torch": torch.__version__,
                "deviations_from_paper": deviations_from_paper(self.profile),
                "known_problems": known_problems(self.profile),
                "init": self.init_report,  # fine-tuning: what was loaded from --init, if any
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
            # The store's identity: a resumed run checks it is training on the same data.
            "classes": list(self.store.classes),
            "stats_sha256": checkpoint.content_digest(checkpoint.stats_tensors(self.stats)),
        }

    def save_checkpoint(self) -> None:
        """state.pt first (the source of truth for --resume), then the exported weights; each
        written atomically, so a kill at any moment leaves the previous complete pair or a
        newer state.pt. A state that is not finite is never written (_check_finite_state)."""
        self._check_finite_state()  # every rank: their weights are the same (DDP)
        device_rng = self._gather_device_rng()  # every rank (a collective under DDP)
        if not self.is_main:
            return
        state = self._state()
        state["rng"]["device_ranks"] = device_rng
        checkpoint.save_state(self.out / "state.pt", state)
        tensors = dict(self.model.state_dict())
        tensors.update(checkpoint.stats_tensors(self.stats))
        meta = checkpoint.weights_metadata(
            self.profile,
            self.store.classes,
            {"step": str(self.pos.step), "epoch": str(self.pos.epoch)},
        )
        checkpoint.save_weights(self.out / "model.safetensors", tensors, meta)

    def _check_finite_state(self) -> None:
        """FloatingPointError if a weight, buffer or optimiser value is NaN or infinite: a step
        can ruin the weights with a finite loss (the loss shows it only at the next step)."""
        named = list(self.model.state_dict().items())
        for i, st in enumerate(self.optimizer.state.values()):
            named += [(f"optimizer state {i} {k}", v) for k, v in st.items()]
        for name, t in named:
            if torch.is_tensor(t) and t.is_floating_point() and not bool(t.isfinite().all()):
                raise FloatingPointError(
                    f"{name} became non-finite at step {self.pos.step} (epoch "
                    f"{self.pos.epoch + 1}); the run stopped without saving it{self._kept()}"
                )

    def _kept(self) -> str:
        """The end of a divergence message: what the run folder keeps (state.pt is written only
        when finite, so the one there is the last good one; there may be none yet)."""
        path = self.out / "state.pt"
        if path.exists():
            return f", and {path} keeps the last good checkpoint"
        return (
            f"; {self.out} holds no checkpoint (it diverged before the first): try a lower lr, "
            "or other --init weights"
        )

    def _cuda_devices(self) -> list[torch.device]:
        return [d for d in self.devices if d.type == "cuda"]

    def _gather_device_rng(self) -> list | None:
        """Each rank's GPU generator states (one per device of its replica), in rank order: the
        dropout masks of the global batch are drawn on every rank's own device, so each
        resumed rank must continue its own generator."""
        cuda = self._cuda_devices()
        if not cuda:
            return None  # the CPU generator: in rng, the same on every rank
        mine = [torch.cuda.get_rng_state(d) for d in cuda]
        return self.dist.all_gather_object(mine) if self._ddp else [mine]

    @property
    def _ddp(self) -> bool:
        return self.dist is not None and self.world > 1

    def _load_checkpoint(self, resume: bool = True) -> None:
        """Resume from state.pt. Under DDP rank 0 alone reads it (its `resume` decides) and
        sends it to every rank, so a rank that cannot see the run folder, or sees another
        copy of it, still continues rank 0's run, never a run of its own."""
        path = self.out / "state.pt"
        state = None
        if self.is_main and resume:
            if path.exists():
                state = checkpoint.load_state(path, map_location="cpu")
                if state.get("format") != RUN_FORMAT:
                    raise BadInput(
                        f"{path}: not a checkpoint of this program ({state.get('format')!r})"
                    )
            elif (self.out / "model.safetensors").exists():
                # state.pt removed (to save space): starting over would overwrite the weights.
                raise BadInput(
                    f"{path} is missing, so {self.out} cannot be resumed, and starting it over "
                    f"would overwrite its weights and metrics; continue from its weights in a "
                    f"new folder: alexnet train --init {self.out} --data STORE --out NEW_RUN"
                )
            else:
                # Killed before its first checkpoint: the run starts over, with its own config.
                print(f"{path}: no checkpoint yet; starting the run over", file=sys.stderr)
                self.log.truncate(0, 0)
        if self._ddp:
            profile, state = self.dist.broadcast_object((self.profile.to_dict(), state))
            if _as_json(profile) != _as_json(self.profile.to_dict()):
                raise BadInput(
                    f"rank {self.rank}'s configuration differs from rank 0's (the run "
                    f"{self.out} as rank 0 reads it): launch every rank with the same command"
                )
        if state is None:
            return
        self._check_store(state, path)  # every rank: each stops, none waits for another
        checkpoint.load_into(self.model, state["model"], path, "of this run's config.json")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.pos = Position(**state["position"])
            self.history = json.loads(state["history"])
            checkpoint.restore_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            why = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise BadInput(f"{path}: not a checkpoint of this run ({why})") from None
        saved = state["rng"].get("device_ranks")
        cuda = self._cuda_devices()
        if saved and cuda:
            # This rank's own generators; with another number of ranks, rank 0's (every rank
            # draws the same global-batch masks, so their generators move in step).
            own = saved[self.rank] if len(saved) == self.world else saved[0]
            for d, st in zip(cuda, own, strict=False):
                torch.cuda.set_rng_state(st, d)
        if self.is_main:
            self.log.truncate(self.pos.epoch, self.pos.step)
            print(
                f"resuming {self.out} at epoch {self.pos.epoch + 1}, batch {self.pos.batch}, "
                f"step {self.pos.step}",
                file=sys.stderr,
            )

    def _check_store(self, state: dict[str, Any], path: Path) -> None:
        """BadInput unless the store is the one the checkpoint was trained on: its classes, in
        their order (as `evaluate` checks them), and its statistics. A store prepared again at
        the same path with the classes in another order would train on swapped labels."""
        classes = state.get("classes")
        if classes is None:  # a checkpoint written before it recorded them: config.json's
            classes = ((read_json(self.out / "config.json") or {}).get("derived") or {}).get(
                "classes"
            )
        if classes is not None:
            same_classes(
                classes,
                self.out,
                self.store,
                remedy="resume it on the store it was trained on",
            )
        saved = state.get("stats_sha256")
        mine = checkpoint.content_digest(checkpoint.stats_tensors(self.stats))
        if saved is not None and saved != mine:
            raise BadInput(
                f"{self.store.path}: its statistics (mean image, colour) are not those "
                f"{self.out} was trained with (the store was prepared again?); resume it on the "
                f"store it was trained on, or start a new run from its weights (--init {self.out})"
            )

    # --- one epoch -----------------------------------------------------------------------
    def _loader(self, epoch: int, start_batch: int):
        return self.train_loader.epoch(
            epoch, start_batch, stop=self.steps_per_epoch, lighting=self.schedule.lighting_on(epoch)
        )

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.mode, self.device):
            out = self.train_model(x)
        # The loss in float32 whatever the autocast dtype (softmax of Sec. 3.5 / cross-entropy).
        return F.cross_entropy(out.float(), y, label_smoothing=self.profile.train.label_smoothing)

    def train_epoch(self, interrupt: Interrupt) -> str:
        """Runs the rest of the current epoch. Returns "done", "interrupted" or "max_steps"."""
        epoch, spe = self.pos.epoch, self.steps_per_epoch
        self.train_model.train()
        losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last log line
        seen, t0, status = 0, time.perf_counter(), "done"
        bar = self.log.bar(total=spe, initial=self.pos.batch, desc=f"epoch {epoch + 1}")
        for x, y in self._loader(epoch, self.pos.batch):
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
            stop = self._stop_requested(interrupt, log_now)
            if log_now or stop:
                rate = seen / (time.perf_counter() - t0)
                self._log_losses(losses, lr, rate, bar, all_ranks=log_now)
            if self.run.checkpoint_every and self.pos.step % self.run.checkpoint_every == 0:
                self._check_finite(losses)
                self.save_checkpoint()
            if stop:
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

    def _log_losses(self, losses, lr: float, rate: float, bar, all_ranks: bool) -> None:
        """A metrics line with the mean loss since the last one: over the global batch when
        every rank logs at this step (`all_ranks`), else this rank's (an interrupt)."""
        self._check_finite(losses)
        mean_loss = torch.stack([v for _, v in losses]).float().mean()
        if all_ranks and self.dist is not None and self.world > 1:
            mean_loss = self.dist.all_reduce_sum(mean_loss.detach().cpu()) / self.world
        rec = {
            "kind": "step",
            "step": self.pos.step,
            "epoch": round(self.pos.epoch + self.pos.batch / self.steps_per_epoch, 4),
            "loss": float(mean_loss),
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
        if not self._ddp:
            return interrupt.requested
        return log_now and self.dist.any(interrupt.requested)

    def _check_finite(self, losses: list[tuple[int, torch.Tensor]]) -> None:
        """FloatingPointError naming the first step whose loss was NaN or infinite. Under DDP
        on every rank if on any (each sees only its part of the global batch's loss), so that
        all stop together."""
        step, value = math.inf, None
        if losses:
            values = torch.stack([v for _, v in losses]).float().cpu()
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                step, value = losses[int(bad[0])][0] + 1, float(values[int(bad[0])])
        if self._ddp:
            first = self.dist.all_reduce_min(step)
            if first != step:
                step, value = first, "non-finite on another rank"
        if step != math.inf:
            raise FloatingPointError(
                f"the loss became {value} at step {int(step)} (epoch {self.pos.epoch + 1}); the "
                f"run stopped{self._kept()}"
            )

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
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
        loader = self._val_loader
        return evaluate_model(
            self.model,
            loader,
            views=1,
            mode=self.mode,
            device=self.device,
            dist=self.dist,
            progress=self.log.bars,
        )

    def end_epoch(self, train_seconds: float) -> None:
        v = self.validate()
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

    def close_loaders(self) -> None:
        """Stop the loader workers (a later epoch or validation starts them again)."""
        self.train_loader.close()
        if self._val_loader is not None:
            self._val_loader.close()

    # --- the run -------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the end of the recipe (or --max-steps, or an interrupt). Rank 0 holds the
        run folder's lock meanwhile (re-entrant: `alexnet train` holds it for its whole life)."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.out) if self.is_main else contextlib.nullcontext():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        if self.is_main:
            write_json(self.out / "config.json", self.resolved_config())
            for problem in known_problems(self.profile):
                print(f"warning: {problem}", file=sys.stderr)
        self.log.open(self.pos.step)
        status = "done"
        try:
            with Interrupt() as interrupt:
                while self.pos.epoch < self.profile.train.epochs:
                    if self._max_steps_reached():  # a resumed run already at its step limit
                        status = "max_steps"
                        break
                    t0 = time.perf_counter()
                    status = self.train_epoch(interrupt)
                    if status == "done":
                        self.end_epoch(time.perf_counter() - t0)
                    self.save_checkpoint()
                    asked = self.dist.any(interrupt.requested) if self._ddp else interrupt.requested
                    if status == "done" and asked:  # during validation
                        status = "interrupted"
                    elif status == "done" and self._max_steps_reached():
                        status = "max_steps"
                    if status != "done":
                        break
        finally:
            self.log.close()
            self.close_loaders()
        result = {"status": status, "position": dataclasses.asdict(self.pos)}
        if self.history:
            result["last_epoch"] = self.history[-1]
        return result
