"""`alexnet train` (and `torchrun ... -m alexnet train`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path

from alexnet import distributed
from alexnet.commands.outputs import make_output_folder, refuse_store
from alexnet.config import (
    PROFILES,
    Profile,
    apply_overrides,
    check_profile,
    flatten,
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
    p.add_argument("--seed", type=int, default=None, help="(default 0)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue RUN (or --out) from its last checkpoint, exactly, with the recipe and "
        "settings its config.json records (--epochs, --device, --workers, --decode and "
        "--max-steps apply; other flags that differ are named in a warning and ignored)",
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
    p.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="STEPS", help="(default 0)"
    )
    p.add_argument("--log-every", type=int, default=None, metavar="STEPS", help="(default 20)")
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
        default=None,
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
        ignored = ignored_on_resume(args, out, profile, run)
        if ignored and distributed.env_rank() == 0:
            print(
                f"warning: --resume {out} goes on with the recipe and settings its config.json "
                f"records; ignored: {', '.join(ignored)}. To change them, start a new run from "
                f"its weights: --init {out} --out NEW_RUN",
                file=sys.stderr,
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
        seed=args.seed if args.seed is not None else 0,
        device=args.device,
        model_parallel=args.model_parallel or 1,
        workers=args.workers,
        decode=args.decode or "auto",
        fast=not args.no_fast,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every if args.checkpoint_every is not None else 0,
        log_every=args.log_every if args.log_every is not None else 20,
        max_steps=args.max_steps,
        val_limit=args.val_limit,
        init=args.init or "",
        init_stats=args.init_stats or "store",
    )
    # Every value checked before anything is written (`--lr nan` writes nothing).
    return check_profile(profile), check_run_config(run), False


# The profile fields that flags of their own set (the others: --set SECTION.FIELD=VALUE).
_TRAIN_FLAGS = {
    "train.batch_size": "--batch-size",
    "train.lr": "--lr",
    "train.init_lr_mult": "--init-lr-mult",
    "train.freeze_until": "--freeze-until",
}


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def ignored_on_resume(args, out: Path, profile: Profile, run: RunConfig) -> list[str]:
    """The flags given with --resume that ask for something other than the run's config.json
    records, each as "FLAG VALUE (the run's: VALUE)": a resumed run goes on with its own
    recipe and settings, so they are ignored. Flags that agree with it (a torchrun restart
    repeats the run's own command line) are not named."""
    ignored = []
    if args.profile is not None and args.profile != profile.name:
        ignored.append(f"--profile {args.profile} (the run's: {profile.name})")
    over = {
        field: getattr(args, field)
        for field in ("batch_size", "lr", "init_lr_mult")
        if getattr(args, field) is not None
    }
    asked = dataclasses.replace(profile, train=dataclasses.replace(profile.train, **over))
    asked = apply_overrides(asked, args.set)  # a malformed --set is an error all the same
    if args.freeze_until is not None:
        until = asked.train.epochs if args.freeze_until == "all" else _epochs(args.freeze_until)
        asked = dataclasses.replace(
            asked, train=dataclasses.replace(asked.train, freeze_until=until)
        )
    mine, theirs = flatten(_as_json(asked.to_dict())), flatten(_as_json(profile.to_dict()))
    set_keys = {item.partition("=")[0] for item in args.set}
    for key, value in mine.items():
        if key in ("name", "description") or value == theirs.get(key):
            continue
        flag = (
            f"{_TRAIN_FLAGS[key]} {value}"
            if key in _TRAIN_FLAGS and key not in set_keys
            else f"--set {key}={value}"
        )
        ignored.append(f"{flag} (the run's: {theirs.get(key)})")
    given = {
        "--data": args.data,
        "--out": args.out if isinstance(args.resume, str) else None,
        "--seed": args.seed,
        "--init": args.init,
        "--init-stats": args.init_stats,
        "--checkpoint-every": args.checkpoint_every,
        "--log-every": args.log_every,
        "--val-limit": args.val_limit,
    }
    recorded = {
        "--data": run.data,
        "--out": str(out),
        "--seed": run.seed,
        "--init": run.init,
        "--init-stats": run.init_stats,
        "--checkpoint-every": run.checkpoint_every,
        "--log-every": run.log_every,
        "--val-limit": run.val_limit,
    }
    for flag, value in given.items():
        if value is None or value == recorded[flag]:
            continue
        if flag in ("--data", "--out", "--init") and recorded[flag]:
            if _same_path(value, recorded[flag]):
                continue
        ignored.append(f"{flag} {value} (the run's: {recorded[flag] or 'none'})")
    if args.no_fast and run.fast:
        ignored.append("--no-fast (the run's: fast)")
    if args.compile is not None and args.compile != run.compile:
        ignored.append(
            f"--{'' if args.compile else 'no-'}compile (the run's: "
            f"{'default' if run.compile is None else run.compile})"
        )
    return ignored


def _as_json(x):
    return json.loads(json.dumps(x, default=str))


def _lock_run_folder(held: contextlib.ExitStack, profile, run, resume: bool) -> bool:
    """Take the run folder for this command's whole life (InUse if another command has it),
    and say whether the Trainer resumes: a new run in a folder that holds the same command
    line's run killed before its first checkpoint (a torchrun restart) starts it over."""
    out = Path(run.out)
    if not resume:
        open_store(run.data)  # a wrong --data is an error before the folder is made
        refuse_store(out, "--out")
        make_output_folder(out, "--out")
    held.enter_context(exclusive_lock(out))
    return resume or run_not_started(out, profile, run)


def check_freeze(trainer: Trainer) -> None:
    """--freeze-until keeps the layers loaded by --init still: with an --init that loaded every
    layer nothing trains meanwhile. Refused when that is the whole run, else a warning."""
    t = trainer.profile.train
    groups = trainer.optimizer.param_groups
    if not t.freeze_until or not groups or not all(g.get("loaded") for g in groups):
        return
    what = f"--init {trainer.run.init} loaded every layer (fc8 too: the same classes)"
    if t.freeze_until >= t.epochs:
        raise BadInput(
            f"{what}, and --freeze-until {t.freeze_until:g} keeps them still for the whole "
            f"run of {t.epochs} epochs: nothing would train. Give a smaller --freeze-until"
        )
    if trainer.is_main:
        print(
            f"warning: {what}: nothing trains until epoch {t.freeze_until:g} (--freeze-until)",
            file=sys.stderr,
        )


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
            if not resume:
                check_freeze(trainer)
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
