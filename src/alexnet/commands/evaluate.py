"""`alexnet evaluate`, `alexnet predict` and `alexnet import-torchvision`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alexnet import checkpoint
from alexnet.devices import resolve_device
from alexnet.errors import BadInput
from alexnet.evaluate import (
    evaluate_networks,
    import_torchvision,
    is_network,
    predict_networks,
    read_classes,
)
from alexnet.runfolder import check_output
from alexnet.runlog import shows_top5

# --device of evaluate and predict: the names devices.resolve_device takes.
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (default: cuda if there is one, else cpu)"


def at_least(value: int | None, lowest: int, flag: str) -> None:
    """BadInput unless the flag was not given or is an integer >= lowest (argparse made it an
    int): `--batch-size 0` is an error, not the default."""
    if value is not None and value < lowest:
        raise BadInput(f"{flag} must be at least {lowest}, got {value}")


def run_evaluate(args) -> int:
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.workers, 0, "--workers")
    at_least(args.val_limit, 1, "--val-limit")
    device = resolve_device(args.device)
    r = evaluate_networks(
        args.weights,
        args.data,
        split=args.split,
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        limit=args.val_limit,
        per_class=args.per_class,
        fast=not args.no_fast,
        progress=sys.stderr.isatty() and not args.json,
        ignore_class_names=args.ignore_class_names,
    )
    num_classes = len(read_classes(args.weights[0]))  # the members share their classes
    if args.json:
        # Every figure, top-5 too, in a fixed schema for the scripts that read it; with
        # num_classes, which tells them whether the top-5 error means anything (shows_top5).
        print(json.dumps({**r, "num_classes": num_classes}, indent=2))
        return 0
    views = f"{args.views} view(s)"
    top5 = shows_top5(num_classes)

    def errors(x: dict) -> str:
        five = f", top-5 error {x['top5_error']:.2%}" if top5 else ""
        return f"top-1 error {x['top1_error']:.2%}{five}, loss {x['loss']:.4f}"

    if len(r["members"]) > 1:
        print(f"{r['images']} images of {args.split} ({r['data']}), {views}, "
              f"{len(r['members'])} networks ({r['memory']}):")  # fmt: skip
        for m in r["members"]:
            print(f"  {m['weights']}: {errors(m)}")
        print(f"  ensemble (softmax averaged over views, then networks): {errors(r['ensemble'])}")
    else:
        print(f"{r['images']} images of {args.split}, {views}: {errors(r)}")
    if args.per_class:
        for m in r["members"]:
            print(f"\n{m['weights']}\n{'class':<30} {'images':>7} {'top-1 error':>12}")
            for name, count, err in zip(
                read_classes(m["weights"]), m["per_class_images"], m["per_class_top1_error"],
                strict=True,
            ):  # fmt: skip
                print(f"{name[:30]:<30} {count:>7} {err:>12.2%}")
    return 0


def run_predict(args) -> int:
    at_least(args.topk, 1, "--topk")
    device = resolve_device(args.device)
    weights, images = split_networks(args.paths)
    results = predict_networks(weights, images, args.topk, args.views, device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_predictions(results)
    return 1 if any("error" in r for r in results) else 0


def split_networks(paths: list[str]) -> tuple[list[str], list[str]]:
    """The leading run folders and .safetensors files (the networks, evaluate.is_network), then
    the images and folders of images."""
    n = 0
    while n < len(paths) and is_network(paths[n]):
        n += 1
    if n == 0:
        torch_file = checkpoint.torch_save_error(paths[0]) if Path(paths[0]).is_file() else None
        raise torch_file or BadInput(
            f"{paths[0]}: the first path must be a run folder or a .safetensors file"
        )
    if n == len(paths):
        raise BadInput("no images to predict: give IMAGE... after the network(s)")
    return paths[:n], paths[n:]


def print_predictions(results: list[dict]) -> None:
    """Each image's top-k classes, or its error on stderr (one line naming the file)."""
    for r in results:
        if "error" in r:
            print(f"{r['path']}: error: {r['error']}", file=sys.stderr)
            continue
        print(r["path"])
        for p in r["predictions"]:
            print(f"  {p['probability']:7.2%}  {p['class']}")


def run_import_torchvision(args) -> int:
    check_output(args.out, "OUT", folder=not args.out.endswith(".safetensors"))
    out = import_torchvision(args.state_dict, args.out)
    print(f"wrote {out}; try: alexnet predict {out} IMAGE.jpg")
    return 0


def add_views_flag(p) -> None:
    """--views, as evaluate and predict both take it."""
    p.add_argument(
        "--views",
        type=int,
        choices=(1, 10),
        default=1,
        help="1: the centre crop (default); 10: the paper's ten views, averaged (Sec. 4.1)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1/top-5 error of trained weights on a store; several: an ensemble (Sec. 6)",
    )
    p.add_argument(
        "weights",
        nargs="+",
        metavar="RUN_OR_WEIGHTS",
        help="one network, or several whose softmax outputs are averaged (an ensemble)",
    )
    p.add_argument(
        "--data",
        help="a prepared store (default: the store the (first) run was trained on)",
    )
    p.add_argument("--split", default="val", help="the store's split to evaluate (default val)")
    add_views_flag(p)
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per batch (default 128; 12 with --views 10: about 128 crops per forward "
        "pass, as larger passes spend their time in page faults on a CPU)",
    )
    p.add_argument(
        "--workers", type=int, help="data loader worker processes (default: from the CPU count)"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--val-limit",
        "--limit",
        dest="val_limit",
        type=int,
        metavar="N",
        help="evaluate N images of the split, class-balanced: N / classes of each class (all "
        "of a smaller class), spread over its images (train's --val-limit; --limit: the old "
        "name)",
    )
    p.add_argument("--per-class", action="store_true", help="a per-class top-1 error table")
    p.add_argument(
        "--ignore-class-names",
        action="store_true",
        help="evaluate even if the store's class names differ from the weights' (matched by "
        "number; the counts must agree)",
    )
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="float32 (default: bfloat16 autocast and channels_last where faster, as training)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON (the top-5 error too, whatever num_classes)",
    )
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser(
        "predict",
        help="top-k classes of images (JPEG, PNG, WebP, any size); several networks: an ensemble",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_WEIGHTS... IMAGE...",
        help="one or more networks (run folders or .safetensors files; several: their softmax "
        "outputs are averaged), then the images and folders of images (every JPEG, PNG, WebP, "
        "... under a folder, recursively, in name order)",
    )
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    add_views_flag(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.set_defaults(handler=run_predict)

    p = sub.add_parser(
        "import-torchvision",
        help="convert torchvision's AlexNet weights (a downloaded state_dict) for predict/evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The file is the one torchvision downloads for alexnet(weights=...), e.g.\n"
        "alexnet-owt-7be5be79.pth; it is loaded with torch.load(weights_only=True).",
    )
    p.add_argument(
        "state_dict", metavar="STATE_DICT_FILE", help="torchvision's AlexNet weights (a .pth file)"
    )
    p.add_argument("out", metavar="OUT", help="a .safetensors file or a folder")
    p.set_defaults(handler=run_import_torchvision)
