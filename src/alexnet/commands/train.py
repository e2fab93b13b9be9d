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
from alexnet.config import (
    CHOICES,
    PROFILES,
    SETTINGS,
    RunConfig,
    RunSpec,
    apply_settings,
    flatten,
    get_profile,
    setting_field,
)
from alexnet.data import open_store
from alexnet.errors import BadInput
from alexnet.runfolder import RunFolder
from alexnet.runlog import shows_top5
from alexnet.train import Trainer

DEFAULT_PROFILE = "paper"
DESCRIPTION = """Train a network on a prepared store (alexnet prepare): the paper's recipe (Sec. 5)
by default, resumable bit for bit.

Every flag below sets a value of the configuration, named after it in brackets: --set
SECTION.FIELD=VALUE sets any value (`alexnet profiles` lists them) and wins over a flag.
The torchvision reference's spellings are accepted where they mean the same (--output-dir,
--data-path, -j, --wd, --print-freq, --test-only); its -b is per GPU, ours the global batch.

RUN (the --out folder) receives config.json (the whole resolved configuration: rerun it with
--config RUN/config.json), metrics.jsonl, model.safetensors, state.pt (what --resume reads),
curves.png and TensorBoard's events."""

# The values a resumed run takes from the command line (the rest: from its config.json).
RESUME_CHANGES = ("train.epochs", "run.device", "run.workers", "run.decode", "run.max_steps")


def _freeze_until(text: str) -> float | str:
    if text == "all":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of epochs, or 'all'") from None


def _flag_type(key: str):
    if key == "train.freeze_until":
        return _freeze_until
    kind = str(setting_field(key).type).replace(" | None", "")
    return {"int": int, "float": float, "str": str}.get(kind, str)


def add_setting_flags(p: argparse.ArgumentParser, keys=None) -> None:
    """A flag for each configuration value of SETTINGS (alexnet.config) that `keys` names (all
    by default): dest is the dotted key, default None (not given), and the help, choices and
    aliases come from the table, so that a flag is the --set key it names."""
    for key in keys or SETTINGS:
        s = SETTINGS[key]
        help_ = f"{s.help} [{key}]"
        if str(setting_field(key).type).startswith("bool"):
            p.add_argument(
                *s.flags, dest=key, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
            continue
        choices = tuple(c for c in CHOICES.get(key, ()) if c is not None) or None
        p.add_argument(
            *s.flags,
            dest=key,
            type=_flag_type(key),
            choices=choices,
            default=None,
            metavar=s.metavar or (None if choices else key.partition(".")[2].upper()),
            help=help_,
        )


def given_settings(args) -> dict[str, object]:
    """{dotted key: value} of the setting flags the command line gave."""
    return {k: getattr(args, k) for k in SETTINGS if getattr(args, k, None) is not None}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default=None,
        choices=tuple(PROFILES),
        help=f"the recipe to start from (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--config",
        metavar="RUN/config.json",
        help="start from the configuration a run recorded (its profile and run settings): "
        "reruns that run, with --out NEW_RUN and any flag changing it",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue RUN (a run folder or a file in it; or --out) from its last checkpoint, "
        "exactly, with the recipe and settings its config.json records (--epochs, --device, "
        "--workers, --decode and --max-steps apply; other flags that differ are named in a "
        "warning and ignored). torchvision's --resume CHECKPOINT: the same",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set any value (SECTION: model, data, train, run), e.g. --set model.lrn=false "
        "--set data.lighting_std=0; wins over the flags",
    )
    p.add_argument(
        "--test-only",
        action="store_true",
        help="evaluate the run of --resume RUN on its validation split (centre view, as after "
        "each epoch) and train nothing (torchvision's --test-only)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data parallel under torchrun (the same as launching with torchrun)",
    )
    add_setting_flags(p)


def _with_flags(args, profile, run) -> tuple:
    """The profile and run settings with the command line's flags and --set applied."""
    flags = given_settings(args)
    profile, run = apply_settings(profile, run, flags, args.set)
    t = profile.train
    if (
        (t.init_lr_mult != 1.0 or t.freeze_until)
        and not run.init
        and ("train.init_lr_mult" in flags or "train.freeze_until" in flags)
    ):
        raise BadInput("--init-lr-mult and --freeze-until act on the layers loaded by --init")
    return profile, run


def config_from_args(args) -> tuple[RunSpec, bool]:
    """The resolved, checked configuration for `alexnet train` arguments, and whether it
    resumes. On --resume, the run's own config.json with only the values of RESUME_CHANGES
    taken from the flags; with --config FILE, that file's, changed by the flags; else the
    profile's and the run defaults, changed by the flags."""
    flags = given_settings(args)
    if args.resume:
        folder = RunFolder(args.resume if isinstance(args.resume, str) else (args.out or ""))
        if not str(args.resume if isinstance(args.resume, str) else (args.out or "")):
            raise BadInput("--resume needs the run folder: --resume RUN or --out RUN")
        spec = folder.read_spec()
        mp = flags.get("run.model_parallel")
        if mp is not None and mp != spec.run.model_parallel:
            raise BadInput(
                f"{folder} was trained with --model-parallel {spec.run.model_parallel}; its "
                f"optimiser state is laid out for that and it resumes only with the same (got {mp})"
            )
        ignored = ignored_on_resume(args, folder.path, spec)
        if ignored and distributed.env_rank() == 0:
            print(
                f"warning: --resume {folder} goes on with the recipe and settings its config.json "
                f"records; ignored: {', '.join(ignored)}. To change them, start a new run from "
                f"its weights: --init {folder} --out NEW_RUN",
                file=sys.stderr,
            )
        # --max-steps belongs to one invocation, not to the run: a resumed run goes on to its end.
        changes = {"run.out": str(folder), "run.max_steps": flags.get("run.max_steps")}
        changes.update({k: v for k, v in flags.items() if k in RESUME_CHANGES[:-1]})
        if changes.get("run.device") == "auto":
            del changes["run.device"]
        profile, run = apply_settings(spec.profile, spec.run, changes)
        return RunSpec.checked(profile, run), True
    if args.config:
        if args.profile:
            raise BadInput("--config and --profile: give one (the config names its profile)")
        base = RunFolder(args.config, flag="--config").read_spec()
        profile, run = _with_flags(args, base.profile, base.run)
    else:
        if "run.data" not in flags or "run.out" not in flags:
            raise BadInput(
                "--data STORE and --out RUN are required (or --resume RUN, or --config "
                "RUN/config.json)"
            )
        profile, run = _with_flags(args, get_profile(args.profile or DEFAULT_PROFILE), RunConfig())
    # Every value checked before anything is written (`--lr nan` writes nothing).
    return _checked(profile, run, flags, args.set), False


def _checked(profile, run, flags: dict, sets: list[str]) -> RunSpec:
    """RunSpec.checked; a value refused names the flag that gave it (--set wins over flags)."""
    try:
        return RunSpec.checked(profile, run)
    except BadInput as e:
        key = str(e).split("=", 1)[0].split(" ", 1)[0]
        set_keys = {item.partition("=")[0] for item in sets}
        if key in flags and key not in set_keys:
            raise BadInput(f"{_shown(key, flags[key], set())}: {e}") from None
        raise


def _same_path(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def _as_json(x):
    return json.loads(json.dumps(x, default=str))


def _shown(key: str, value, set_keys: set[str]) -> str:
    """How the command line gave `key` = `value`: its flag, or --set."""
    if key in SETTINGS and key not in set_keys:
        flag = next(f for f in SETTINGS[key].flags if f.startswith("--"))
        if isinstance(value, bool):
            return f"--{'' if value else 'no-'}{flag[2:]}"
        return f"{flag} {value}"
    return f"--set {key}={value}"


def ignored_on_resume(args, out: Path, spec: RunSpec) -> list[str]:
    """The flags given with --resume that ask for something other than the run's config.json
    records, each as "FLAG VALUE (the run's: VALUE)": a resumed run goes on with its own
    recipe and settings, so they are ignored. Flags that agree with it (a torchrun restart
    repeats the run's own command line) are not named."""
    ignored = []
    if args.profile is not None and args.profile != spec.profile.name:
        ignored.append(f"--profile {args.profile} (the run's: {spec.profile.name})")
    run = dataclasses.replace(spec.run, out=str(out))
    flags = {k: v for k, v in given_settings(args).items() if k not in RESUME_CHANGES}
    if not isinstance(args.resume, str):
        flags.pop("run.out", None)  # --resume --out RUN: the run's own folder
    # (a malformed --set is an error all the same)
    asked_profile, asked_run = apply_settings(spec.profile, run, flags, args.set)
    set_keys = {item.partition("=")[0] for item in args.set}
    mine = flatten(_as_json({**asked_profile.to_dict(), "run": dataclasses.asdict(asked_run)}))
    theirs = flatten(_as_json({**spec.profile.to_dict(), "run": dataclasses.asdict(run)}))
    for key, value in mine.items():
        if key in ("name", "description") or key in RESUME_CHANGES or value == theirs.get(key):
            continue
        if key in ("run.data", "run.out", "run.init") and theirs[key] and value:
            if _same_path(value, theirs[key]):
                continue
        ignored.append(f"{_shown(key, value, set_keys)} (the run's: {theirs.get(key) or 'none'})")
    return ignored


def _hold_run_folder(held: contextlib.ExitStack, spec: RunSpec, resume: bool) -> bool:
    """Take the run folder for this command's whole life (RunFolder.hold) and say whether the
    Trainer resumes; a wrong --data is an error before the folder is made."""
    if not resume:
        open_store(spec.run.data)
    return held.enter_context(RunFolder(spec.run.out).hold(spec, resume))


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


def top_errors(metrics: dict, num_classes: int, prefix: str = "val_") -> str:
    """ "top-1 error X%, top-5 Y%": top-5 only where it means something (more than 5 classes;
    with 5 or fewer it is always 0)."""
    text = f"top-1 error {metrics[prefix + 'top1_error']:.2%}"
    if shows_top5(num_classes):
        text += f", top-5 {metrics[prefix + 'top5_error']:.2%}"
    return text


def test_only(spec: RunSpec) -> int:
    """--test-only: the run's last weights on its validation split, as after each epoch."""
    with RunFolder(spec.run.out).hold(spec, resume=True):
        trainer = Trainer(spec, resume=True)
        try:
            v = trainer.evaluate()
        finally:
            trainer.close_loaders()
    print(
        f"{spec.run.out} at step {trainer.pos.step}: val {top_errors(v, trainer.num_classes, '')}"
        f", loss {v['loss']:.4f} ({v['images']:,} images, centre view)"
    )
    return 0


def run_train(args) -> int:
    out = getattr(args, "run.out")
    if not args.resume and elastic_restart() and out and (Path(out) / "state.pt").exists():
        # torchrun restarted the workers after a failure (--max-restarts): continue the run.
        args.resume = out
    if args.test_only and not args.resume:
        raise BadInput("--test-only evaluates a run: give it with --resume RUN")
    spec, resume = config_from_args(args)
    if args.test_only:
        return test_only(spec)
    run = spec.run
    with contextlib.ExitStack() as held:
        if distributed.env_rank() == 0:  # the rank that writes the run folder
            resume = _hold_run_folder(held, spec, resume)
        with distributed.context(
            run.device, requested=args.distributed, model_parallel=run.model_parallel
        ) as dist:
            trainer = Trainer(spec, resume=resume, dist=dist)
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
        step = result["position"]["step"]
        if status == "max_steps" and result["position"]["epoch"] < spec.profile.train.epochs:
            # not the end of the recipe: say so (it printed "done" with the last epoch's error)
            print(
                f"stopped at step {step} (--max-steps); checkpoint saved. Continue with: "
                f"alexnet train --resume {run.out}"
            )
        elif last:
            print(
                f"done: val {top_errors(last, trainer.num_classes)}; weights {where}; curves "
                f"{run.out}/curves.png"
            )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network on a prepared store (the paper's recipe by default)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
