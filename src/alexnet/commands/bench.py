"""`alexnet bench model`, `convs`, `data` and `e2e` (alexnet.benchmarks)."""

from __future__ import annotations

import json
import os

import torch

from alexnet.benchmarks import convs, e2e
from alexnet.benchmarks import data as bd
from alexnet.benchmarks import model as bm
from alexnet.benchmarks import ops as bo
from alexnet.benchmarks.report import (
    check_markdown_path,
    machine_info,
    machine_lines,
    markers,
    write_section,
)
from alexnet.devices import available_cpus, resolve_device
from alexnet.errors import BadInput


def run_bench_model(args) -> int:
    check_markdown_path(args.markdown)
    device = resolve_device(args.device or "auto")
    # --quick: a smoke test of the whole path (tests/test_bench.py), not a measurement.
    batch = args.batch_size or (4 if args.quick else 128)
    steps = args.steps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    classes = args.num_classes or (10 if args.quick else 1000)
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    elif args.quick:
        modes = ["fp32", "fp32+cl"]
    else:
        modes = bm.available_modes(device, compile=args.compile)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    loops = {"plain": ["plain"], "tuned": ["tuned"], "both": ["plain", "tuned"]}[args.loop]
    results = {}
    for loop in loops:  # plain first: glibc's tuning cannot be undone in a process
        r = bm.run_model_bench(
            profiles=profiles,
            modes=modes,
            batch_size=batch,
            steps=steps,
            warmup=warmup,
            num_classes=classes,
            device=device,
            peak_size=256 if args.quick else 2048,
            tune_allocator=loop == "tuned",
            fuse=not args.unfused,
            log=(lambda *a: None) if args.json else print,
        )
        r["settings"]["loop"] = loop
        r["settings"]["command"] = (
            f"alexnet bench model --loop {args.loop} --profiles {','.join(profiles)} --modes "
            f"{','.join(modes)} --batch-size {batch} --steps {steps} --warmup {warmup} "
            f"--num-classes {classes}" + (" --unfused" if args.unfused else "")
        )
        results[loop] = r
        if args.markdown:
            bm.write_markdown(args.markdown, r)
        if not args.json:
            print(f"\n{loop} loop:\n{bm.format_table(r)}")
    if args.json:  # the last loop's result; with both, the plain loop's under "plain_loop"
        out = dict(results[loops[-1]])
        if len(loops) == 2:
            out["plain_loop"] = results["plain"]
        print(json.dumps(out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure model and data-loading speed on this machine")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True

    m = bsub.add_parser(
        "model",
        help="training/inference images/s of each profile and torchvision's AlexNet",
        description=bm.__doc__.split("\n\n", 1)[1],
    )
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.add_argument(
        "--profiles",
        default=",".join(bm.DEFAULT_PROFILES),
        help=f"comma-separated profiles (default {','.join(bm.DEFAULT_PROFILES)})",
    )
    m.add_argument("--batch-size", type=int, help="batch size (default 128; --quick: 4)")
    m.add_argument("--steps", type=int, help="timed repeats per configuration (5; --quick: 2)")
    m.add_argument("--warmup", type=int, help="warm-up steps per configuration (2; --quick: 1)")
    m.add_argument(
        "--modes",
        help="comma-separated modes, e.g. fp32,fp32+cl,bf16,bf16+cl,bf16+cl+compile "
        "(default: fp32 and bf16 where native, each with and without channels_last)",
    )
    m.add_argument("--compile", action="store_true", help="add the default mode +compile")
    m.add_argument("--num-classes", type=int, help="classes of the last layer (default 1000)")
    m.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    m.add_argument(
        "--loop",
        choices=("plain", "tuned", "both"),
        default="both",
        help="plain: a user's own loop (torch.optim.SGD, glibc's malloc as it is); tuned: with "
        "alexnet.speed.tune_cpu_allocator() first, as alexnet train does; both (default): plain, "
        "then tuned, in one process",
    )
    m.add_argument(
        "--unfused",
        action="store_true",
        help="measure the plain two-tower network (default: its fast form, alexnet.fast.fuse, "
        "as alexnet train runs it)",
    )
    m.add_argument("--markdown", metavar="FILE", help="also write the table into FILE (Markdown)")
    m.add_argument(
        "--quick", action="store_true", help="tiny batch and few steps (a smoke test, for tests)"
    )
    m.set_defaults(handler=run_bench_model)

    o = bsub.add_parser(
        "ops",
        help="where a plain training step's time goes: per layer and per operator",
        description=bo.__doc__,
    )
    o.add_argument(
        "--profiles",
        default="paper,torchvision",
        help="comma-separated (default paper,torchvision)",
    )
    o.add_argument(
        "--modes", default="fp32,bf16+cl", help="comma-separated speed modes (default fp32,bf16+cl)"
    )
    o.add_argument("--batch-sizes", default="64,128", help="comma-separated (default 64,128)")
    o.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    o.add_argument("--repeats", type=int, default=5, help="timings per layer (default 5)")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    o.add_argument("--markdown", metavar="FILE", help="also write the tables into FILE")
    o.set_defaults(handler=run_bench_ops)
    c = bsub.add_parser(
        "convs",
        help="conv2 grouped vs two dense convolutions, conv1, with cudnn.benchmark off and on",
        description=convs.__doc__.split("\n\n", 1)[1],
    )
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--batch-size", type=int, default=256, help="default 256")
    c.add_argument("--steps", type=int, default=20, help="timed repeats per case (default 20)")
    c.add_argument("--warmup", type=int, default=3, help="warm-up repeats per case (default 3)")
    c.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    c.add_argument("--markdown", metavar="FILE", help="also write the table into FILE")
    c.set_defaults(handler=run_bench_convs)

    d = bsub.add_parser("data", help="training loader images/s against the ImageFolder baseline")
    add_data_arguments(d)
    d.set_defaults(handler=run_bench_data)

    e = bsub.add_parser(
        "e2e",
        help="end-to-end training images/s and GPU busy: store + loader + paper net against a "
        "torchvision reference loop",
        description=e2e.__doc__.split("\n\n", 1)[1],
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--images", type=int, default=20000, help="JPEGs to make (default 20000)")
    e.add_argument("--steps", type=int, default=200, help="timed steps per loop (default 200)")
    e.add_argument("--warmup", type=int, default=20, help="warm-up steps per loop (default 20)")
    e.add_argument("--batch-size", type=int, default=256, help="default 256")
    e.add_argument("--workers", type=int, help="loader workers for both (default: cores - 1)")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument(
        "--decode",
        help="comma-separated: cpu (loader workers), gpu (nvJPEG); default both on CUDA",
    )
    e.add_argument("--dir", help="work folder for the JPEGs and the store (default: /tmp)")
    e.add_argument("--markdown", metavar="FILE", help="also write the table into FILE")
    e.set_defaults(handler=run_bench_e2e)


def run_bench_convs(args) -> int:
    check_markdown_path(args.markdown)
    result = convs.run_convs_bench(
        device=resolve_device(args.device or "auto"),
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        log=(lambda *a: None) if args.json else print,
    )
    if args.markdown:
        write_section(args.markdown, convs.format_markdown(result))
    print(json.dumps(result) if args.json else convs.format_table(result))
    return 0


def run_bench_e2e(args) -> int:
    check_markdown_path(args.markdown)
    if args.images < 1:
        raise BadInput("--images must be positive")
    decodes = None
    if args.decode:
        decodes = tuple(d.strip() for d in args.decode.split(",") if d.strip())
    result = e2e.run_e2e(
        images=args.images,
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        workers=args.workers,
        device=resolve_device(args.device or "auto"),
        decodes=decodes,
        work_dir=args.dir,
        log=(lambda *a: None) if args.json else print,
    )
    if args.markdown:
        write_section(args.markdown, e2e.format_markdown(result))
    print(json.dumps(result) if args.json else e2e.format_table(result))
    return 0


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_bench_ops(args) -> int:
    check_markdown_path(args.markdown)
    try:
        batches = [int(b) for b in _list(args.batch_sizes)]
    except ValueError:
        raise BadInput(f"--batch-sizes {args.batch_sizes!r}: comma-separated numbers") from None
    for m in _list(args.modes):
        bm.FastMode.from_label(m)  # a clear error before any work
    machine = machine_info(torch.device("cpu"))
    result = bo.run_ops_bench(
        _list(args.profiles), _list(args.modes), batches, args.steps, args.repeats,
        log=(lambda *a: None) if args.json else print,
    )  # fmt: skip
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    command = (
        f"alexnet bench ops --profiles {args.profiles} --modes {args.modes} --batch-sizes "
        f"{args.batch_sizes} --steps {args.steps} --repeats {args.repeats}"
    )
    if args.markdown:
        begin, end = markers("bench ops")
        lines = machine_lines(machine, command)
        write_section(args.markdown, bo.format_markdown(result, lines, begin, end))
    if args.json:
        print(json.dumps(result | {"machine": machine, "command": command}))
    return 0


def add_data_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--images", type=int, default=2048, help="JPEGs to make (default 2048)")
    parser.add_argument("--workers", type=int, help="loader workers for both (default: cores)")
    parser.add_argument(
        "--encoding",
        choices=("jpeg", "raw"),
        default="jpeg",
        help="store record encoding to measure (default jpeg)",
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time each side at least this long (default 3)"
    )
    parser.add_argument(
        "--markdown", metavar="FILE", help="also write the result into FILE (BENCHMARKS.md)"
    )


def run_bench_data(args) -> int:
    if args.images < 512:
        raise BadInput("--images must be at least 512 (four batches of 128 per epoch)")
    workers = args.workers if args.workers is not None else available_cpus()
    if workers < 1:
        raise BadInput("--workers must be at least 1")
    check_markdown_path(args.markdown)
    machine = machine_info(torch.device("cpu"))
    result = bd.run_bench(
        args.images,
        workers,
        args.encoding,
        min_seconds=args.seconds,
        log=(lambda *a: None) if args.json else print,
    )
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["machine"] = machine
    result["command"] = (
        f"alexnet bench data --images {args.images} --workers {workers} --encoding "
        f"{args.encoding} --seconds {args.seconds:g}"
    )
    if args.markdown:
        write_section(args.markdown, bd.format_markdown(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"ratio {result['ratio']:.2f}x (per CPU-second {result['ratio_per_cpu_s']:.2f}x); "
            f"per worker: loader "
            f"{result['loader_images_per_s_per_worker']:.0f}, baseline "
            f"{result['baseline_images_per_s_per_worker']:.0f} images/s; store "
            f"{result['store_bytes_per_image'] / 1024:.1f} KiB/image ({result['encoding']})"
        )
    return 0
