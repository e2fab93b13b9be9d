"""`alexnet figure1`, `ablate`, `recipes`, `finetune`, `kernels`, `neighbors`, `report`: the paper's
experiments and figures (alexnet.experiments), one command each. The four studies share one
registration (`register_study`): each is a StudyCommand, its flags and its config.

Why one file of this length: one command module per family; these are the experiments'
argument parsers and printing, nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alexnet.config import get_profile
from alexnet.data.sources import FASHION_MNIST_DIR
from alexnet.devices import resolve_device
from alexnet.errors import BadInput
from alexnet.experiments import (
    ablate,
    cifar_nets,
    figure1,
    finetune,
    kernels,
    neighbors,
    recipes,
    report,
)
from alexnet.experiments.common import select_rows
from alexnet.runfolder import check_output


@dataclass(frozen=True)
class StudyCommand:
    """A study's command line: its experiment module (run, markdown, docstring as the
    description), its flags as (names, add_argument keywords), and the config they make."""

    name: str
    module: Any
    help: str
    flags: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    config: Callable[[argparse.Namespace], Any]


def flag(*names: str, **kw: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return names, kw


def register(sub) -> None:
    for command in STUDIES:
        register_study(sub, command)
    for add in (register_kernels, register_neighbors, register_report):
        add(sub)


def register_study(sub, c: StudyCommand) -> None:
    """The one registration of the studies (figure1, ablate, recipes, finetune)."""
    p = sub.add_parser(c.name, help=c.help, description=c.module.__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", default=f"runs/{c.name}", help=f"output folder (runs/{c.name})")
    for names, kw in c.flags:
        p.add_argument(*names, **kw)
    p.set_defaults(handler=lambda args: run_study_command(c, args))


def run_study_command(c: StudyCommand, args) -> int:
    """Run a study of many trainings; Ctrl-C keeps what is done (a rerun resumes)."""
    cfg = c.config(args)
    try:
        summary = getattr(c.module, f"run_{c.name}")(cfg)
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs are kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    print(getattr(c.module, f"{c.name}_markdown")(summary))
    print(f"wrote {Path(cfg.out) / c.name}.md, {c.name}.json, {c.name}.png", file=sys.stderr)
    return 0


# The options of the studies that train the paper's network (as `alexnet train`'s).
SET = flag("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
           help="an override for every run (as alexnet train --set)")  # fmt: skip
TRAINING = (
    SET,
    flag("--device", default="auto", help="auto (default), cpu, cuda"),
    flag("--workers", type=int, help="loader worker processes"),
    flag("--no-fast", action="store_true", help="float32, default memory format"),
)
FASHION = flag("--fashion-mnist", default=FASHION_MNIST_DIR, metavar="DIR",
               help=f"the Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return values


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInput(f"{what}: not a number: {text!r}") from None


def figure1_config(args) -> figure1.Figure1Config:
    base = figure1.QUICK if args.quick else figure1.FULL
    threshold, at_epoch = figure1.PAPER_THRESHOLD, base["threshold_epoch"]
    if args.threshold is not None:
        text = args.threshold
        if text.startswith("relu@"):  # the ReLU net's own error after that many epochs
            threshold, at_epoch = None, _number(text[5:], "--threshold relu@EPOCHS")
        else:
            threshold, at_epoch = _number(text, "--threshold"), None
            if not 0 < threshold < 1:
                raise BadInput(f"--threshold {text} must be between 0 and 1")
    elif at_epoch is not None:
        threshold = None
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    return figure1.Figure1Config(
        out=args.out, data=args.data, fashion_mnist=args.fashion_mnist, seeds=pick("seeds"),
        epochs=pick("epochs"), threshold=threshold, threshold_epoch=at_epoch,
        search_epochs=args.search_epochs or base["search_epochs"], fast=not args.no_fast,
        batch_size=args.batch_size, train_images=pick("train_images"),
        points_per_epoch=pick("points_per_epoch"),
        lr_grid=args.lr_grid or (figure1.QUICK_LR_GRID if args.quick else figure1.FULL_LR_GRID),
        lr={"relu": args.lr_relu, "tanh": args.lr_tanh}, device=str(resolve_device(args.device)),
        net=args.net,
    )  # fmt: skip


FIGURE1 = (
    flag("--data", metavar="CIFAR10_DIR",
         help="CIFAR-10 python batches (default: Fashion-MNIST's IDX files)"),
    FASHION,
    flag("--quick", action="store_true",
         help=f"a few minutes on a 2-core CPU: {figure1.QUICK}, lr grid {figure1.QUICK_LR_GRID}"),
    flag("--net", default="four", choices=tuple(cifar_nets.NETS),
         help="four (default): the 2012 file's layers-80sec net without fc64, PyTorch's init, "
         "inputs over their std; layers-80sec: the file's five-layer net, its init, raw pixels "
         "minus the mean"),
    flag("--seeds", type=int, help="runs per activation (full 3, quick 2)"),
    flag("--epochs", type=int, help="epochs per run (full 30, quick 3)"),
    flag("--search-epochs", type=int, help="epochs of the lr-search runs (full 10; quick: "
         "--epochs)"),
    flag("--threshold", metavar="ERROR|relu@EPOCHS",
         help="target training error: a number (quick: 0.25, the paper's), or relu@E: the error "
         "the chosen ReLU net (seed 0) has after E epochs (full: relu@5)"),
    flag("--no-fast", action="store_true",
         help="float32 (default: bf16 autocast and channels_last where the CPU has native bf16)"),
    flag("--batch-size", type=int, default=128, help="default 128 (Sec. 5)"),
    flag("--train-images", type=int,
         help="train on a fixed subset of N images (quick: 4000; full: all)"),
    flag("--points-per-epoch", type=int, help="training-error points per epoch (full 5, quick 8)"),
    flag("--lr-grid", type=_floats, metavar="LR,LR,...",
         help=f"rates searched per activation (full {figure1.FULL_LR_GRID})"),
    flag("--lr-relu", type=float, help="fixed ReLU rate (no search)"),
    flag("--lr-tanh", type=float, help="fixed tanh rate (no search)"),
    flag("--device", default="cpu", help="cpu (default), cuda, auto"),
)  # fmt: skip


def ablate_config(args) -> ablate.AblateConfig:
    base = ablate.QUICK if args.quick else ablate.FULL
    rows = [v.key for v in ablate.VARIANTS[1:]]
    only = select_rows(args.only, rows, "--only", {"conv": ablate.CONV})
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    return ablate.AblateConfig(
        out=args.out, data=args.data, profile=args.profile, seeds=pick("seeds"),
        steps=pick("steps"), batch_size=pick("batch_size"), val_limit=pick("val_limit"),
        store_limit=pick("store_limit"), only=only, sets=tuple(args.set),
        device=args.device, workers=args.workers, keep_weights=args.keep_weights,
        quick=args.quick, fast=not args.no_fast,
    )  # fmt: skip


ABLATE = (
    flag("--data", metavar="STORE",
         help="a prepared store (default: prepare Fashion-MNIST into OUT)"),
    flag("--profile", default="demo", help="the base recipe (default demo)"),
    flag("--quick", action="store_true", help=f"minutes on a 2-core CPU: {ablate.QUICK}"),
    flag("--seeds", type=int, help=f"seeds per row (full {ablate.FULL['seeds']})"),
    flag("--steps", type=int, help=f"training steps per run (full {ablate.FULL['steps']})"),
    flag("--batch-size", type=int, help="batch size (default 64, quick and full)"),
    flag("--val-limit", type=int,
         help=f"validation (and training-error) images (full {ablate.FULL['val_limit']})"),
    flag("--store-limit", type=int,
         help="images per split when preparing Fashion-MNIST (quick 2000; full: all)"),
    flag("--only", metavar="ROW,ROW", help="rows besides the baseline: "
         + ",".join(v.key for v in ablate.VARIANTS[1:]) + " (conv = conv3,conv4,conv5)"),
    flag("--keep-weights", action="store_true",
         help="keep every run's model.safetensors (240 MB each)"),
    *TRAINING,
)  # fmt: skip


def recipes_config(args) -> recipes.RecipesConfig:
    base = recipes.QUICK if args.quick else recipes.FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    names = base["recipes"]
    if args.recipes is not None:
        names = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    for name in names:
        get_profile(name)  # a clear error for an unknown profile, before any work
    controls = base["controls"]
    if args.controls is not None:
        keys = select_rows(args.controls, list(recipes.BY_KEY), "--controls",
                           {"all": tuple(recipes.BY_KEY)})  # fmt: skip
        controls = tuple(dict.fromkeys(["baseline", *keys])) if keys else ()
    epochs, steps, seeds = pick("epochs"), pick("control_steps"), pick("seeds")
    if epochs < 0 or steps < 1 or seeds < 1:
        raise BadInput("--epochs must be >= 0, --control-steps and --seeds >= 1")
    return recipes.RecipesConfig(
        out=args.out, data=args.data, recipes=names if epochs > 0 else (), epochs=epochs,
        controls=controls, control_steps=steps, seeds=seeds, margin=args.margin,
        log_every=args.log_every, device=args.device, workers=args.workers,
        fast=not args.no_fast, val_limit=pick("val_limit"), store_limit=pick("store_limit"),
        sets=tuple(args.set),
    )  # fmt: skip


RECIPES = (
    flag("--data", metavar="STORE",
         help="a prepared store (default: prepare Fashion-MNIST into OUT)"),
    flag("--quick", action="store_true", help=f"minutes on a 2-core CPU: {recipes.QUICK}"),
    flag("--recipes", metavar="PROFILE,PROFILE",
         help=f"profiles to train (default {','.join(recipes.DEFAULT_RECIPES)})"),
    flag("--epochs", type=int, help="epochs per recipe (0: none; default 3)"),
    flag("--controls", metavar="KEY,KEY|all",
         help="short runs from `paper`, one change each: " + ", ".join(recipes.BY_KEY)),
    flag("--control-steps", type=int, help="steps per control (default 400)"),
    flag("--seeds", type=int, help="seeds per control (default 2)"),
    flag("--margin", type=float, default=0.1, help="below ln(classes) by (0.1)"),
    flag("--log-every", type=int, default=10, help="steps per logged loss (10)"),
    flag("--val-limit", type=int, help="validation images per epoch (default all)"),
    flag("--store-limit", type=int,
         help="images per split when preparing Fashion-MNIST (quick 2000; default all)"),
    *TRAINING,
)  # fmt: skip


def finetune_config(args) -> finetune.FinetuneConfig:
    base = finetune.QUICK if args.quick else finetune.FULL
    budgets = base["budgets"]
    if args.budgets:
        try:
            budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
        except ValueError:
            raise BadInput(
                f"--budgets {args.budgets!r}: comma-separated numbers of images"
            ) from None
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    return finetune.FinetuneConfig(
        out=args.out, source=args.fashion_mnist, profile=args.profile,
        pretrain_images=pick("pretrain_images"), budgets=budgets, seeds=pick("seeds"),
        store_limit=base["store_limit"], val_limit=base["val_limit"],
        init_lr_mult=args.init_lr_mult, device=args.device, workers=args.workers,
        fast=not args.no_fast,
    )  # fmt: skip


FINETUNE = (
    flag("--quick", action="store_true", help=f"a smoke test: {finetune.QUICK}"),
    flag("--budgets", metavar="N,N,...",
         help=f"training images of B (full {finetune.FULL['budgets']})"),
    flag("--seeds", type=int, help=f"seeds per budget (full {finetune.FULL['seeds']})"),
    flag("--pretrain-images", type=int, help="images of A to pre-train on (30000)"),
    flag("--profile", default="demo", help="the recipe of every run (default demo)"),
    flag("--init-lr-mult", type=float, default=1.0, help="the loaded layers' lr factor (1)"),
    FASHION,
    *TRAINING[1:],  # no --set: the arms differ only by the pre-trained start
)  # fmt: skip

STUDIES = (
    StudyCommand("figure1", figure1, "Figure 1: ReLU vs tanh, epochs to 25%% training error "
                 "(four-layer conv net)", FIGURE1, figure1_config),
    StudyCommand("ablate", ablate, "the paper's ablations (LRN, pooling, PCA lighting, dropout, "
                 "towers, conv3-5)", ABLATE, ablate_config),
    StudyCommand("recipes", recipes, "do the paper's recipes learn? loss curves, the step "
                 "leaving chance, controls", RECIPES, recipes_config),
    StudyCommand("finetune", finetune, "does pre-training help? Fashion-MNIST 5 + 5 classes, "
                 "fine-tuned vs from scratch", FINETUNE, finetune_config),
)  # fmt: skip


def run_kernels(args) -> int:
    rep = kernels.run_kernels(args.run, args.out, args.scale)
    print(kernels.kernels_markdown(rep))
    return 0


def register_kernels(sub) -> None:
    p = sub.add_parser(
        "kernels",
        help="Figure 3: the conv1 kernels (tower A above tower B) and their colour specificity",
        description=kernels.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a .safetensors weights file")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--scale", type=int, default=4, help="pixels per kernel pixel (default 4)")
    p.set_defaults(handler=run_kernels)


def run_neighbors(args) -> int:
    device = str(resolve_device(args.device))
    r = neighbors.run_neighbors(
        args.run,
        args.data,
        args.out,
        args.images,
        args.index,
        args.split,
        args.k,
        args.top5,
        args.train_limit,
        args.seed,
        args.batch_size,
        args.workers,
        device,
    )
    print(neighbors.neighbors_markdown(r))
    return 0


def register_neighbors(sub) -> None:
    p = sub.add_parser(
        "neighbors",
        help="Figure 4: nearest training images in fc7 space (and --top5 predictions)",
        description=neighbors.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a .safetensors weights file")
    p.add_argument("--data", required=True, metavar="STORE", help="a prepared store")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--images", type=int, default=5, help="random query images (default 5)")
    g.add_argument("--index", metavar="I,J,K", help="these query images of --split")
    p.add_argument("--split", default="val", help="where the queries come from (default val)")
    p.add_argument("--k", type=int, default=6, help="neighbours per query (default 6, Fig. 4)")
    p.add_argument("--top5", action="store_true", help="add the top-5 predictions panel")
    p.add_argument("--train-limit", type=int, help="search only the first N training images")
    p.add_argument("--seed", type=int, default=0, help="of the random queries")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default 32)"
    )
    p.add_argument("--workers", type=int, help="loader worker processes")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.set_defaults(handler=run_neighbors)


def run_report(args) -> int:
    if args.out and Path(args.out).suffix.lower() in (".html", ".htm"):
        raise BadInput(
            f"--out {args.out}: a folder, as in every command (the page is OUT/report.html)"
        )
    if Path(args.run).is_dir():  # (else build_report says it is not a run folder)
        check_output(Path(args.out or args.run), "--out")
        page = Path(args.out or args.run) / "report.html"
        check_output(page, "--out", folder=False)
        check_output(page.with_name(page.stem + "_files"), "--out")  # its figures
    device = str(resolve_device(args.device))
    page = report.build_report(
        args.run, args.out, args.data, args.images, args.train_limit or None, device
    )
    print(f"wrote {page}")
    return 0


def register_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page for a run (curves, errors, kernels, neighbours)",
        description=report.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder (alexnet train --out RUN)")
    p.add_argument(
        "--out", metavar="DIR", help="output folder: DIR/report.html (default: the run folder)"
    )
    p.add_argument(
        "--data",
        metavar="STORE",
        help="store for the neighbours (default: the run's, if it still exists)",
    )
    p.add_argument("--images", type=int, default=4, help="query images for the neighbours")
    p.add_argument(
        "--train-limit",
        type=int,
        default=2000,
        help="training images searched for neighbours (default 2000; 0: all)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.set_defaults(handler=run_report)
