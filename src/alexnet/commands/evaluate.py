"""`alexnet evaluate`, `alexnet predict` and `alexnet import-torchvision`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alexnet.commands.outputs import check_output
from alexnet.devices import resolve_device
from alexnet.errors import BadInput
from alexnet.evaluate import evaluate_networks, import_torchvision, predict_networks, read_classes


def at_least(value: int | None, lowest: int, flag: str) -> None:
    """BadInput unless the flag was not given or is an integer >= lowest (argparse made it an
    int): `--batch-size 0` is an error, not the default."""
    if value is not None and value < lowest:
        raise BadInput(f"{flag} must be at least {lowest}, got {value}")


def run_evaluate(args) -> int:
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.workers, 0, "--workers")
    at_least(args.limit, 1, "--limit")
    device = resolve_device(args.device)
    r = evaluate_networks(
        args.weights,
        args.data,
        split=args.split,
        views=args.views,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        limit=args.limit,
        per_class=args.per_class,
        fast=not args.no_fast,
        progress=sys.stderr.isatty() and not args.json,
        ignore_class_names=args.ignore_class_names,
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    views = f"{args.views} view(s)"
    if len(r["members"]) > 1:
        print(f"{r['images']} images of {args.split} ({r['data']}), {views}, "
              f"{len(r['members'])} networks ({r['memory']}):")  # fmt: skip
        for m in r["members"]:
            print(f"  {m['weights']}: top-1 error {m['top1_error']:.2%}, top-5 error "
                  f"{m['top5_error']:.2%}, loss {m['loss']:.4f}")  # fmt: skip
        e = r["ensemble"]
        print(
            "  ensemble (softmax averaged over views, then networks): top-1 error "
            f"{e['top1_error']:.2%}, top-5 error {e['top5_error']:.2%}, loss {e['loss']:.4f}"
        )
    else:
        print(
            f"{r['images']} images of {args.split}, {views}: top-1 error "
            f"{r['top1_error']:.2%}, top-5 error {r['top5_error']:.2%}, loss {r['loss']:.4f}"
        )
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
    """The leading run folders and .safetensors files (the networks), then the images."""
    n = 0
    while n < len(paths) and (Path(paths[n]).is_dir() or paths[n].endswith(".safetensors")):
        n += 1
    if n == 0:
        raise BadInput(f"{paths[0]}: the first path must be a run folder or a .safetensors file")
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
    p.add_argument("--split", default="val")
    p.add_argument("--views", type=int, choices=(1, 10), default=1, help="1: centre; 10: Sec. 4.1")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per batch (default 128; 12 with --views 10: about 128 crops per forward "
        "pass, as larger passes spend their time in page faults on a CPU)",
    )
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--limit", type=int, help="N images spread evenly over the split (a class-balanced sample)"
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
    p.add_argument("--json", action="store_true")
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
        "outputs are averaged), then the images",
    )
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--views", type=int, choices=(1, 10), default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_predict)

    p = sub.add_parser(
        "import-torchvision",
        help="convert torchvision's AlexNet weights (a downloaded state_dict) for predict/evaluate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The file is the one torchvision downloads for alexnet(weights=...), e.g.\n"
        "alexnet-owt-7be5be79.pth; it is loaded with torch.load(weights_only=True).",
    )
    p.add_argument("state_dict", metavar="STATE_DICT_FILE")
    p.add_argument("out", metavar="OUT", help="a .safetensors file or a folder")
    p.set_defaults(handler=run_import_torchvision)
