"""`alexnet prepare [SRC] OUT`."""

from __future__ import annotations

from pathlib import Path

from alexnet.data.images import MAX_PIXELS
from alexnet.data.prepare import DEFAULT_QUALITY, ENCODINGS, prepare_store
from alexnet.data.sources import FASHION_MNIST_DIR, KINDS, download_fashion_mnist, idx_file
from alexnet.errors import BadInput
from alexnet.fileio import MAX_FILE_BYTES
from alexnet.runfolder import check_output


def run_prepare(args) -> int:
    if args.store_limit is not None and args.store_limit < 1:
        # (before: 0 said "no training images", and -N dropped the last N images of each split)
        raise BadInput(f"--store-limit must be at least 1, got {args.store_limit}")
    check_output(args.out, "OUT")  # before SRC is listed (minutes for ImageNet)
    if args.src is None:
        if args.kind not in (None, "fashion-mnist"):
            raise BadInput(f"--kind {args.kind} needs SRC: alexnet prepare SRC OUT")
        src, kind = FASHION_MNIST_DIR, "fashion-mnist"
    else:
        src, kind = args.src, args.kind
    if args.download:
        if kind not in (None, "fashion-mnist"):
            raise BadInput("--download is for --kind fashion-mnist only")
        if idx_file(Path(src), "train-images-idx3-ubyte") is None:
            download_fashion_mnist(Path(src))
        kind = "fashion-mnist"
    prepare_store(
        src,
        args.out,
        kind=kind,
        size=args.size,
        workers=args.workers,
        val_fraction=args.val_fraction,
        seed=args.seed,
        encoding=args.encoding,
        jpeg_quality=args.jpeg_quality,
        limit=args.store_limit,
        chunk_size=args.chunk_size,
        progress=not args.quiet,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        max_pixels=args.max_pixels,
        max_file_bytes=int(args.max_file_mb * 2**20),
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="prepare an image dataset the paper's way into a fast store",
        description=(
            "Read SRC once (ImageNet, an image folder tree, Fashion-MNIST, CIFAR-10) and write "
            "the store OUT: every image rescaled (shorter side to --size) and centre-cropped as "
            "in Sec. 2 of the paper, plus the training-set statistics. Re-running a killed "
            "prepare resumes it. With a single path, it is OUT and SRC is the Fashion-MNIST "
            f"files in {FASHION_MNIST_DIR}."
        ),
    )
    p.add_argument(
        "src",
        nargs="?",
        metavar="SRC",
        help=f"the source (default: the Fashion-MNIST files in {FASHION_MNIST_DIR})",
    )
    p.add_argument("out", metavar="OUT", help="the store to write (a new or empty directory)")
    p.add_argument("--kind", choices=KINDS, help="what SRC holds (default: detect it)")
    p.add_argument("--size", type=int, default=256, help="stored image side (default 256)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument(
        "--val-fraction",
        type=float,
        help="hold out this fraction of each class as val (default: the source's own val "
        "split, else 0.1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split")
    p.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="jpeg",
        help="record encoding: jpeg (default, ~10x smaller) or raw (uint8 pixels, fastest)",
    )
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_QUALITY, help="default 90")
    p.add_argument(
        "--store-limit",
        "--limit",
        dest="store_limit",
        type=int,
        metavar="N",
        help="at most N images per split (quick trials; --limit: the old name)",
    )
    p.add_argument(
        "--classes",
        metavar="C,C,...",
        help="only these classes (names or indices), relabelled in this order",
    )
    p.add_argument("--chunk-size", type=int, help="images per shard (default: from the size)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"skip (and report) images of more pixels than this, before decoding them "
        f"(default and most: Pillow's limit, {MAX_PIXELS:,})",
    )
    p.add_argument(
        "--max-file-mb",
        type=float,
        default=MAX_FILE_BYTES / 2**20,
        help=f"skip (and report) files larger than this, without reading them "
        f"(default {MAX_FILE_BYTES / 2**20:g} MiB)",
    )
    p.add_argument("--download", action="store_true", help="fetch Fashion-MNIST (internet)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_prepare)
