"""`alexnet train` (and `torchrun ... -m alexnet train`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from alexnet import distributed
from alexnet.config import (
    PROFILES,
    Profile,
    apply_overrides,
    check_profile,
    get_profile,
    replace_checked,
)
from alexnet.data import open_store
from alexnet.errors import BadInput
from alexnet.fileio import exclusive_lock
from alexnet.train import RunConfig, Trainer, check_run_config, read_run_config, run_not_started
from alexnet.train import __doc__ as TRAIN_DOC

DEFAULT_PROFILE = "paper"


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a prepared store (alexnet prepare)")
    p.add_argument("--out", help="the run folder (created)")
    p.add_argument(
        "--profile",
        default=None,
        help=f"recipe: one of {', '.join(PROFILES)} (default {DEFAULT_PROFILE})",
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
    p.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default=None,
        help="where JPEG records are decoded: the loader workers (cpu), the GPU (nvJPEG), or "
        "auto: the GPU on CUDA when a short measurement at the start finds it faster (default)",
    )
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
    g = p.add_argument_group(
        "fine-tuning (Sec. 6: pre-trained, then fine-tuned)",
        "Start from other weights: every tensor whose name and shape match is loaded bit for "
        "bit; the classifier (fc8) keeps the profile's initialisation when the class names "
        "differ. config.json records what was loaded and what was not.",
    )
    g.add_argument("--init", metavar="RUN_OR_WEIGHTS", help="weights to start from")
    g.add_argument(
        "--init-lr-mult",
        type=float,
        metavar="F",
        help="the loaded layers' lr is F times the new layers' (default 1: the same)",
    )
    g.add_argument(
        "--freeze-until",
        metavar="EPOCHS",
        help="the loaded layers keep still (lr 0) until this epoch; 'all': the whole run "
        "(default 0: never)",
    )
    g.add_argument(
        "--init-stats",
        choices=("store", "init"),
        default="store",
        help="the mean image and colour statistics of the training store (default, as the paper "
        "fine-tuned with ILSVRC-2012's own mean) or those saved with the --init weights",
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
            raise BadInput("--resume needs the run folder: --resume RUN or --out RUN")
        profile, run = read_run_config(out)
        mp = getattr(args, "model_parallel", None)
        if mp is not None and mp != run.model_parallel:
            raise BadInput(
                f"{out} was trained with --model-parallel {run.model_parallel}; its optimiser "
                f"state is laid out for that and it resumes only with the same (got {mp})"
            )
        # --max-steps belongs to one invocation, not to the run: a resumed run goes on to its end.
        changes = {"out": str(out), "max_steps": args.max_steps}
        for flag, field in (("device", "device"), ("workers", "workers"), ("decode", "decode")):
            v = getattr(args, flag)
            if v is not None and v != "auto":
                changes[field] = v
        if args.epochs is not None:  # extend a finished run
            profile = dataclasses.replace(
                profile, train=dataclasses.replace(profile.train, epochs=args.epochs)
            )
        run = dataclasses.replace(run, **changes)
        return check_profile(profile), check_run_config(run), True
    if not args.data or not args.out:
        raise BadInput("--data STORE and --out RUN are required (or --resume RUN)")
    profile = get_profile(args.profile or DEFAULT_PROFILE)
    train_over = {}
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr")):
        v = getattr(args, flag)
        if v is not None:
            train_over[field] = v
    if args.init_lr_mult is not None:
        train_over["init_lr_mult"] = args.init_lr_mult
    profile = dataclasses.replace(
        profile, train=replace_checked(profile.train, "train", **train_over)
    )
    profile = apply_overrides(profile, args.set)
    if args.freeze_until is not None:
        until = profile.train.epochs if args.freeze_until == "all" else _epochs(args.freeze_until)
        profile = dataclasses.replace(
            profile, train=dataclasses.replace(profile.train, freeze_until=until)
        )
    if (args.init_lr_mult is not None or args.freeze_until is not None) and not args.init:
        raise BadInput("--init-lr-mult and --freeze-until act on the layers loaded by --init")
    if args.val_limit is not None and args.val_limit < 1:  # before an epoch, not after it
        raise BadInput(f"--val-limit must be at least 1, got {args.val_limit}")
    out = Path(args.out)
    run = RunConfig(
        data=args.data,
        out=str(out),
        seed=args.seed,
        device=args.device,
        model_parallel=args.model_parallel or 1,
        workers=args.workers,
        decode=args.decode or "auto",
        fast=not args.no_fast,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        max_steps=args.max_steps,
        val_limit=args.val_limit,
        init=args.init or "",
        init_stats=args.init_stats,
    )
    # Every value checked before anything is written (`--lr nan` writes nothing).
    return check_profile(profile), check_run_config(run), False


def _lock_run_folder(held: contextlib.ExitStack, profile, run, resume: bool) -> bool:
    """Take the run folder for this command's whole life (InUse if another command has it),
    and say whether the Trainer resumes: a new run in a folder that holds the same command
    line's run killed before its first checkpoint (a torchrun restart) starts it over."""
    out = Path(run.out)
    if not resume:
        open_store(run.data)  # a wrong --data is an error before the folder is made
        out.mkdir(parents=True, exist_ok=True)
    held.enter_context(exclusive_lock(out))
    return resume or run_not_started(out, profile, run)


def _epochs(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInput(f"--freeze-until {text!r}: a number of epochs, or 'all'") from None


def elastic_restart() -> bool:
    """True in workers that torchrun started again after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def run_train(args) -> int:
    if (
        not args.resume
        and elastic_restart()
        and args.out
        and (Path(args.out) / "state.pt").exists()
    ):
        # torchrun restarted the workers after a failure (--max-restarts): continue the run.
        args.resume = args.out
    profile, run, resume = config_from_args(args)
    with contextlib.ExitStack() as held:
        if distributed.env_rank() == 0:  # the rank that writes the run folder
            resume = _lock_run_folder(held, profile, run, resume)
        with distributed.context(
            run.device, requested=args.distributed, model_parallel=run.model_parallel
        ) as dist:
            trainer = Trainer(profile, run, resume=resume, dist=dist)
            try:
                result = trainer.fit()
            except FloatingPointError as e:
                if trainer.is_main:
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


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network on a prepared store (the paper's recipe by default)",
        description=TRAIN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
