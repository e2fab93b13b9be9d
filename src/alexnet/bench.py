"""`alexnet bench model` (training-step and inference speed of every profile against
torchvision's AlexNet) and `alexnet bench data` (the loader against the ImageFolder baseline;
implemented in alexnet.data.bench)."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure model and data-loading speed on this machine")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True
    from alexnet.data import bench as data_bench

    d = bsub.add_parser("data", help="training loader images/s against the ImageFolder baseline")
    data_bench.add_arguments(d)
    d.set_defaults(func=data_bench.run)
