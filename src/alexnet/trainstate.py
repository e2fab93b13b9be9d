"""What lies under the training loop (alexnet.train): the position in the run, Ctrl-C, the
fine-tuning start, and the checkpoint (state.pt and model.safetensors) with the RNG states,
written only when finite and read back bit for bit, under DDP by rank 0 for every rank."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet import checkpoint
from alexnet.errors import BadInput, NotFound
from alexnet.evaluate import same_classes
from alexnet.fileio import read_json
from alexnet.runfolder import RUN_FORMAT

# `t` below is the alexnet.train.Trainer whose state is saved or loaded (not imported: it
# imports this module).


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimiser steps in all


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


def _as_json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# --- fine-tuning's start ------------------------------------------------------------------------
def init_weights(t: Any, model, resume: bool) -> dict[str, Any]:
    """Fine-tuning's start: the --init weights where they fit (checkpoint.init_from). A resumed
    run takes its weights from its checkpoint and what was loaded from its config.json, so the
    --init file need not be there any more. Sets t.stats with --init-stats init."""
    run = t.run
    own = t.out / "model.safetensors"
    if resume and (t.out / "state.pt").exists():
        report = json.loads((t.out / "config.json").read_text())["derived"]["init"]
        stats_from = own
    else:
        source = Path(run.init)
        source = source / "model.safetensors" if source.is_dir() else source
        if not source.exists():
            raise NotFound(f"--init {run.init}: no such weights file or run folder")
        report = checkpoint.init_from(model, source, t.store.classes)
        stats_from = source
    if run.init_stats == "init":
        _, t.stats = checkpoint.split_weights(stats_from, checkpoint.load_weights(stats_from)[0])
        if t.stats.mean_image.shape[0] != t.store.image_size:
            raise BadInput(
                f"--init-stats init: {stats_from} holds the statistics of "
                f"{t.stats.mean_image.shape[0]}-pixel images, the store {t.store.image_size}"
            )
    report["stats"] = run.init_stats
    return report


# --- finite values -------------------------------------------------------------------------------
def kept(out: Path) -> str:
    """The end of a divergence message: what the run folder keeps (state.pt is written only
    when finite, so the one there is the last good one; there may be none yet)."""
    path = out / "state.pt"
    if path.exists():
        return f", and {path} keeps the last good checkpoint"
    return (
        f"; {out} holds no checkpoint (it diverged before the first): try a lower lr, or other "
        "--init weights"
    )


def check_finite_losses(t: Any, losses: list[tuple[int, torch.Tensor]]) -> None:
    """FloatingPointError naming the first step whose loss was NaN or infinite. Under DDP on
    every rank if on any (each sees only its part of the global batch's loss), so that all
    stop together."""
    step, value = math.inf, None
    if losses:
        values = torch.stack([v for _, v in losses]).float().cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step, value = losses[int(bad[0])][0] + 1, float(values[int(bad[0])])
    if t.ddp:
        first = t.dist.all_reduce_min(step)
        if first != step:
            step, value = first, "non-finite on another rank"
    if step != math.inf:
        raise FloatingPointError(
            f"the loss became {value} at step {int(step)} (epoch {t.pos.epoch + 1}); the run "
            f"stopped{kept(t.out)}"
        )


def check_finite_state(t: Any) -> None:
    """FloatingPointError if a weight, buffer or optimiser value is NaN or infinite: a step can
    ruin the weights with a finite loss (the loss shows it only at the next step)."""
    named = list(t.model.state_dict().items())
    for i, st in enumerate(t.optimizer.state.values()):
        named += [(f"optimizer state {i} {k}", v) for k, v in st.items()]
    for name, v in named:
        if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all()):
            raise FloatingPointError(
                f"{name} became non-finite at step {t.pos.step} (epoch {t.pos.epoch + 1}); the "
                f"run stopped without saving it{kept(t.out)}"
            )


# --- the checkpoint ------------------------------------------------------------------------------
def _cuda_devices(t: Any) -> list[torch.device]:
    return [d for d in t.devices if d.type == "cuda"]


def _gather_device_rng(t: Any) -> list | None:
    """Each rank's GPU generator states (one per device of its replica), in rank order: the
    dropout masks of the global batch are drawn on every rank's own device, so each resumed
    rank must continue its own generator."""
    cuda = _cuda_devices(t)
    if not cuda:
        return None  # the CPU generator: in rng, the same on every rank
    mine = [torch.cuda.get_rng_state(d) for d in cuda]
    return t.dist.all_gather_object(mine) if t.ddp else [mine]


def save(t: Any) -> None:
    """state.pt first (the source of truth for --resume), then the exported weights; each
    written atomically, so a kill at any moment leaves the previous complete pair or a newer
    state.pt. A state that is not finite is never written."""
    check_finite_state(t)  # every rank: their weights are the same (DDP)
    device_rng = _gather_device_rng(t)  # every rank (a collective under DDP)
    if not t.is_main:
        return
    state = {
        "format": RUN_FORMAT,
        "model": {k: v.detach().cpu() for k, v in t.model.state_dict().items()},
        "optimizer": t.optimizer.state_dict(),
        "schedule": t.schedule.state_dict(),
        "position": dataclasses.asdict(t.pos),
        "rng": checkpoint.capture_rng_state(),
        "history": json.dumps(t.history),
        # The store's identity: a resumed run checks it is training on the same data.
        "classes": list(t.store.classes),
        "stats_sha256": checkpoint.content_digest(checkpoint.stats_tensors(t.stats)),
    }
    state["rng"]["device_ranks"] = device_rng
    checkpoint.save_state(t.out / "state.pt", state)
    tensors = dict(t.model.state_dict())
    tensors.update(checkpoint.stats_tensors(t.stats))
    meta = checkpoint.weights_metadata(
        t.profile, t.store.classes, {"step": str(t.pos.step), "epoch": str(t.pos.epoch)}
    )
    checkpoint.save_weights(t.out / "model.safetensors", tensors, meta)


def _read(t: Any, resume: bool) -> dict[str, Any] | None:
    """Rank 0's state.pt when resuming (None: nothing to resume from yet)."""
    path = t.out / "state.pt"
    if not (t.is_main and resume):
        return None
    if path.exists():
        state = checkpoint.load_state(path, map_location="cpu")
        if state.get("format") != RUN_FORMAT:
            raise BadInput(f"{path}: not a checkpoint of this program ({state.get('format')!r})")
        return state
    if (t.out / "model.safetensors").exists():
        # state.pt removed (to save space): starting over would overwrite the weights.
        raise BadInput(
            f"{path} is missing, so {t.out} cannot be resumed, and starting it over would "
            f"overwrite its weights and metrics; continue from its weights in a new folder: "
            f"alexnet train --init {t.out} --data STORE --out NEW_RUN"
        )
    # Killed before its first checkpoint: the run starts over, with its own config.
    print(f"{path}: no checkpoint yet; starting the run over", file=sys.stderr)
    t.log.truncate(0, 0)
    return None


def load(t: Any, resume: bool) -> None:
    """Resume from state.pt. Under DDP rank 0 alone reads it (its `resume` decides) and sends
    it to every rank, so a rank that cannot see the run folder, or sees another copy of it,
    still continues rank 0's run, never a run of its own."""
    path = t.out / "state.pt"
    state = _read(t, resume)
    if t.ddp:
        profile, state = t.dist.broadcast_object((t.profile.to_dict(), state))
        if _as_json(profile) != _as_json(t.profile.to_dict()):
            raise BadInput(
                f"rank {t.rank}'s configuration differs from rank 0's (the run {t.out} as rank "
                f"0 reads it): launch every rank with the same command"
            )
    if state is None:
        return
    _check_store(t, state, path)  # every rank: each stops, none waits for another
    checkpoint.load_into(t.model, state["model"], path, "of this run's config.json")
    try:
        t.optimizer.load_state_dict(state["optimizer"])
        t.schedule.load_state_dict(state["schedule"])
        t.pos = Position(**state["position"])
        t.history = json.loads(state["history"])
        checkpoint.restore_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise BadInput(f"{path}: not a checkpoint of this run ({why})") from None
    saved = state["rng"].get("device_ranks")
    cuda = _cuda_devices(t)
    if saved and cuda:
        # This rank's own generators; with another number of ranks, rank 0's (every rank draws
        # the same global-batch masks, so their generators move in step).
        own = saved[t.rank] if len(saved) == t.world else saved[0]
        for d, st in zip(cuda, own, strict=False):
            torch.cuda.set_rng_state(st, d)
    if t.is_main:
        t.log.truncate(t.pos.epoch, t.pos.step)
        print(
            f"resuming {t.out} at epoch {t.pos.epoch + 1}, batch {t.pos.batch}, step {t.pos.step}",
            file=sys.stderr,
        )


def _check_store(t: Any, state: dict[str, Any], path: Path) -> None:
    """BadInput unless the store is the one the checkpoint was trained on: its classes, in
    their order (as `evaluate` checks them), and its statistics. A store prepared again at the
    same path with the classes in another order would train on swapped labels."""
    classes = state.get("classes")
    if classes is None:  # a checkpoint written before it recorded them: config.json's
        classes = ((read_json(t.out / "config.json") or {}).get("derived") or {}).get("classes")
    if classes is not None:
        same_classes(classes, t.out, t.store, remedy="resume it on the store it was trained on")
    saved = state.get("stats_sha256")
    mine = checkpoint.content_digest(checkpoint.stats_tensors(t.stats))
    if saved is not None and saved != mine:
        raise BadInput(
            f"{t.store.path}: its statistics (mean image, colour) are not those {t.out} was "
            f"trained with (the store was prepared again?); resume it on the store it was "
            f"trained on, or start a new run from its weights (--init {t.out})"
        )
