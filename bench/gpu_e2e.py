"""End-to-end training throughput on a GPU: our loader + the paper net in bfloat16, against
torchvision's reference-style loop (ImageFolder over JPEGs, float32), in one run.

Run by bench/gpu.sh on a lent GPU machine; also runs (slowly) on a CPU for a smoke test:
    python bench/gpu_e2e.py --images 256 --steps 3 --batch-size 16
Prints a JSON object last. GPU utilisation is sampled with nvidia-smi while each loop runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_jpegs(root: Path, n: int, classes: int = 10) -> None:
    """ImageNet-sized JPEGs (about 500x375) cut from scikit-image's photos."""
    from PIL import Image
    from skimage import data as sk

    photos = [sk.chelsea(), sk.coffee(), sk.astronaut(), sk.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        img = Image.fromarray(p).resize(
            (int(w * rng.uniform(1.0, 1.4)), int(h * rng.uniform(1.0, 1.4)))
        )
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.jpg", quality=90)
    for c in range(classes):  # a small val split for the store
        d = root / "val" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[c % len(photos)]).save(d / "v.jpg", quality=90)


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi, every 0.2 s) while a loop runs; None without a GPU."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._ok = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            )
            try:
                self.samples.append(float(out.stdout.split()[0]))
            except (ValueError, IndexError):
                pass
            time.sleep(0.2)

    def __enter__(self):
        if self._ok:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._ok:
            self._t.join()

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def timed_loop(batches, step, steps: int, warmup: int, device) -> float:
    """images/s over `steps` steps after `warmup` steps (loader included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(it)
        step(x, y)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def ours(store, device, batch, steps, warmup, workers):
    from alexnet import data
    from alexnet.config import get_profile
    from alexnet.model import build_model
    from alexnet.optim import make_optimizer
    from alexnet.speed import autocast, default_fast_mode, maybe_compile, prepare_model

    profile = get_profile("paper")
    st = data.open_store(store)
    mode = default_fast_mode(device)
    model = prepare_model(build_model(profile, num_classes=st.num_classes, devices=[device]), mode)
    runner = maybe_compile(model, mode)
    opt = make_optimizer(model, profile.train)

    def step(x, y):
        with autocast(mode, device):
            out = runner(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(out.float(), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches():
        epoch = 0
        while True:
            yield from data.make_train_loader(
                st, profile.data, batch, seed=0, epoch=epoch, workers=workers, device=device
            )
            epoch += 1

    with GpuSampler() as s:
        rate = timed_loop(batches(), step, steps, warmup, device)
    return rate, s.mean, mode


def baseline(folder, device, batch, steps, warmup, workers):
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomCrop(224, pad_if_needed=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(folder), tf)
    dl = torch.utils.data.DataLoader(
        ds,
        batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    model = torchvision.models.alexnet(num_classes=len(ds.classes)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        loss = F.cross_entropy(
            model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches():
        while True:
            yield from dl

    with GpuSampler() as s:
        rate = timed_loop(batches(), step, steps, warmup, device)
    return rate, s.mean


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table into FILE")
    args = ap.parse_args()
    import os

    from alexnet.bench import check_markdown_path, machine_info

    check_markdown_path(args.markdown)

    workers = args.workers if args.workers is not None else (os.cpu_count() or 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_info(device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="alexnet-gpu-"))
    src, store = root / "jpegs", root / "store"
    t0 = time.perf_counter()
    if not (src / "train").exists():
        make_jpegs(src, args.images)
    from alexnet.cli import main as cli

    if cli(["prepare", str(src), str(store), "--kind", "folder", "--workers", str(workers)]):
        sys.exit("prepare failed")
    prep_s = time.perf_counter() - t0
    r_ours, u_ours, mode = ours(store, device, args.batch_size, args.steps, args.warmup, workers)
    r_base, u_base = baseline(
        src / "train", device, args.batch_size, args.steps, args.warmup, workers
    )
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "workers": workers,
        "batch_size": args.batch_size,
        "ours_mode": mode.label,
        "ours_images_per_s": r_ours,
        "ours_gpu_util_percent": u_ours,
        "baseline_images_per_s": r_base,
        "baseline_gpu_util_percent": u_base,
        "ratio": r_ours / r_base,
        "prepare_seconds": prep_s,
    }
    print(
        f"\n| loop | images/s | GPU busy % |\n|---|---|---|\n"
        f"| ours: store + paper net, {mode.label} | {r_ours:.0f} | {u_ours} |\n"
        f"| torchvision reference loop: ImageFolder JPEG, fp32 | {r_base:.0f} | {u_base} |\n"
        f"ratio {r_ours / r_base:.2f}x"
    )
    if args.markdown:
        write_markdown(args, result, machine)
    print(json.dumps(result))


def write_markdown(args, result: dict, machine: dict) -> None:
    """The end-to-end table as a BENCHMARKS.md section (alexnet.bench's section format)."""
    from alexnet.bench import machine_lines, markers, section_name, write_section

    begin, end = markers(section_name("bench e2e", machine))
    r = result
    command = (
        f"python bench/gpu_e2e.py --images {args.images} --steps {args.steps} --warmup "
        f"{args.warmup} --batch-size {args.batch_size} --workers {r['workers']}"
    )
    lines = [
        begin,
        f"## End-to-end training throughput ({r['device']})",
        "",
        *machine_lines(machine, command),
        f"- {args.images:,} generated JPEGs prepared into a store in {r['prepare_seconds']:.0f} s; "
        f"{args.warmup} warm-up + {args.steps} timed training steps of {r['batch_size']} per "
        f"loop, {r['workers']} loader workers; GPU busy % sampled with nvidia-smi.",
        "",
        "| loop | images/s | GPU busy % |",
        "|---|---:|---:|",
        f"| ours: store + make_train_loader + paper net, {r['ours_mode']} | "
        f"{r['ours_images_per_s']:.0f} | {r['ours_gpu_util_percent']} |",
        "| baseline: torchvision reference loop, ImageFolder JPEG, fp32 | "
        f"{r['baseline_images_per_s']:.0f} | {r['baseline_gpu_util_percent']} |",
        "",
        f"Ratio: **{r['ratio']:.2f}x**.",
        end,
    ]
    write_section(args.markdown, "\n".join(lines))


if __name__ == "__main__":
    main()
