"""`alexnet bench data`: the training loader against the common baseline, on the same images.

In a temporary directory: JPEGs of ImageNet-typical size (500x375 and 375x500, quality 90) cut
with random offsets, scales and reflections from the real photos scikit-image ships; `alexnet
prepare` of them into a store; then, with the same number of worker processes, the images/s of
  - the loader: make_train_loader (random 224 crop, flip, PCA lighting, mean image subtracted,
    float32 batches of 128 ready on the CPU), and
  - the baseline: torchvision ImageFolder over the JPEGs with RandomCrop(224),
    RandomHorizontalFlip, ToTensor, Normalize in a DataLoader (batch 128, shuffled).
Both are timed in steady state: from the first batch of each epoch to its last, so worker
start-up is left out of both alike.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from alexnet.benchmarks.report import machine_lines, markers, section_name
from alexnet.config import DataConfig
from alexnet.data import make_train_loader, prepare_store
from alexnet.errors import BadInput

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


_PHOTOS: list = []  # the photos, loaded once per process that makes JPEGs


def _photos() -> list:
    try:  # an optional dependency: the [bench] extra (and [dev]); asked each time, cache or not
        import skimage.data
    except ImportError:
        raise BadInput(
            "the benchmarks make their JPEGs from scikit-image's photos: "
            "pip install 'alexnet[bench]'"
        ) from None
    if not _PHOTOS:
        _PHOTOS.extend(Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS)
    return _PHOTOS


def _make_jpegs(task) -> int:
    """JPEGs i0..i1-1 (one worker's share); each image a function of (seed, i) alone, so the
    files are the same whatever the number of workers."""
    root, i0, i1, classes, seed = task
    photos, total = _photos(), 0
    for i in range(i0, i1):
        rng = np.random.default_rng([seed, i])
        img = photos[i % len(photos)]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        s = rng.uniform(0.6, 1.0) * min(img.width / w, img.height / h)
        cw, ch = int(w * s), int(h * s)
        x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        out = img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = Path(root) / f"class{i % classes}" / f"img{i:05d}.jpg"
        out.save(path, "JPEG", quality=90)
        total += path.stat().st_size
    return total


def make_jpegs(root: Path, n: int, classes: int = 8, seed: int = 0, workers: int = 1) -> int:
    """n JPEGs of ImageNet-typical size in root/<class>/ (an ImageFolder tree), made by
    `workers` processes (20,000 take minutes on one core); returns their total bytes."""
    _photos()  # a missing scikit-image is a clear error here, not in a worker
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, n))
    step = -(-n // (4 * workers)) if n else 1  # a few tasks per worker: an even finish
    tasks = [(str(root), i, min(n, i + step), classes, seed) for i in range(0, n, step)]
    if workers == 1:
        return sum(map(_make_jpegs, tasks))
    with mp.get_context("fork").Pool(workers) as pool:  # as `alexnet prepare`'s workers
        return sum(pool.imap_unordered(_make_jpegs, tasks))


def _children_memory_mb() -> dict[str, float]:
    """Memory of this process's children (the loader workers), from /proc/<pid>/smaps_rollup:
    private (their own) and proportional (shared pages divided among their users)."""
    private = pss = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                for pid in f.read().split():
                    with open(f"/proc/{pid}/smaps_rollup") as st:
                        for line in st:
                            key, _, rest = line.partition(":")
                            if key in ("Private_Clean", "Private_Dirty"):
                                private += int(rest.split()[0])
                            elif key == "Pss":
                                pss += int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return {"workers_private_mb": private / 1024, "workers_pss_mb": pss / 1024}


def _touch(x) -> None:
    """Read one value in every 4 KiB page of a batch, as any consumer reads the whole batch:
    a batch handed over in shared memory costs its page faults on first touch, and that is
    part of delivering it."""
    flat = x.reshape(-1)
    float(flat[:: 4096 // flat.element_size()].sum())


class _Meter:
    """Wall time from the first batch of each epoch to its last (steady state), and CPU time
    of the main process and its workers over whole epochs (the per-core cost; unlike wall
    time it holds on a machine that other jobs share; it includes worker start-up)."""

    def __init__(self):
        self.timed = 0.0
        self.images = 0  # in the timed part
        self.all_images = 0
        self.cpu = 0.0
        self.mem: dict[str, float] = {}

    def epoch(self, iterable, probe_memory: bool = False) -> None:
        cpu0 = time.process_time()
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        it = iter(iterable)
        x, _y = next(it)
        _touch(x)
        self.all_images += len(x)
        t0 = time.perf_counter()
        n = 0
        for k, (x, _y) in enumerate(it):
            _touch(x)
            n += len(x)
            if k == 2 and probe_memory and not self.mem:
                self.mem = _children_memory_mb()
        self.timed += time.perf_counter() - t0
        self.images += n
        self.all_images += n
        del it, x  # joins the workers, so that their CPU time is counted
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu += time.process_time() - cpu0
        self.cpu += (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)

    @property
    def rate(self) -> float:
        return self.images / self.timed if self.timed else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return self.all_images / self.cpu if self.cpu else float("nan")


def run_bench(
    images: int,
    workers: int,
    encoding: str = "jpeg",
    seed: int = 0,
    min_seconds: float = 3.0,
    log=print,
) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the consumer does nothing but take batches
    try:
        return _run_bench(images, workers, encoding, seed, min_seconds, log)
    finally:
        torch.set_num_threads(threads)


def _run_bench(images, workers, encoding, seed, min_seconds, log) -> dict:
    batch = 128
    with tempfile.TemporaryDirectory(prefix="alexnet-bench-") as tmp:
        src = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        jpeg_bytes = make_jpegs(src, images, seed=seed, workers=max(1, workers))
        log(
            f"made {images} JPEGs ({jpeg_bytes / images / 1024:.0f} KiB each) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        store = prepare_store(
            src,
            Path(tmp) / "store",
            kind="folder",
            val_fraction=0.05,
            workers=workers,
            encoding=encoding,
            progress=False,
            log=lambda *a: None,
        )
        prep_rate = images / (time.perf_counter() - t0)
        data = DataConfig()  # the paper's views: crop 224, flip, PCA lighting, mean image

        tf = T.Compose(
            [
                T.RandomCrop(224),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        folder = ImageFolder(str(src), transform=tf)
        # Epochs of the two alternate, so that both see the same share of whatever else the
        # machine is doing.
        ours, base = _Meter(), _Meter()
        rss0 = _rss_mb()
        e = 0
        while e < 2 or min(ours.timed, base.timed) < min_seconds:
            loader = make_train_loader(store, data, batch, seed=seed, epoch=e, workers=workers)
            try:
                ours.epoch(loader, probe_memory=True)
            finally:
                loader.close()
            if e == 0:
                main_rss = _rss_mb() - rss0
            base.epoch(
                DataLoader(
                    folder, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
                )
            )
            e += 1
            if e >= 20:
                break
        loader_rate, loader_cpu, mem = ours.rate, ours.per_cpu_s, ours.mem
        base_rate, base_cpu = base.rate, base.per_cpu_s
        log(
            f"loader:   {loader_rate:8.0f} images/s with {workers} workers, "
            f"{loader_cpu:.0f} images per CPU-second"
        )
        log(
            f"baseline: {base_rate:8.0f} images/s with {workers} workers, "
            f"{base_cpu:.0f} images per CPU-second"
        )
        per = max(1, workers)
        result = {
            "loader_images_per_s": round(loader_rate, 1),
            "baseline_images_per_s": round(base_rate, 1),
            "workers": workers,
            "ratio": round(loader_rate / base_rate, 2),
            "loader_images_per_s_per_worker": round(loader_rate / per, 1),
            "loader_images_per_cpu_s": round(loader_cpu, 1),
            "baseline_images_per_cpu_s": round(base_cpu, 1),
            "ratio_per_cpu_s": round(loader_cpu / base_cpu, 2),
            "baseline_images_per_s_per_worker": round(base_rate / per, 1),
            "store_bytes_per_image": round(store.manifest["bytes_per_image"], 1),
            "source_jpeg_bytes_per_image": round(jpeg_bytes / images, 1),
            "encoding": encoding,
            "images": images,
            "batch_size": batch,
            "prepare_images_per_s": round(prep_rate, 1),
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "epochs": e,
            "main_rss_growth_mb": round(main_rss, 1),
            **{k: round(v, 1) for k, v in mem.items()},
        }
    return result


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_markdown(result: dict) -> str:
    """The result as a BENCHMARKS.md section: machine, date, command, baseline, table."""
    m, r = result["machine"], result
    # One section per core count: a 16-core GPU host's figures sit beside a 2-core laptop's.
    begin, end = markers(section_name(f"bench data, {r['workers']} workers", {"device": "cpu"}))
    rows = [
        ("loader: store + make_train_loader", r["loader_images_per_s"],
         r["loader_images_per_s_per_worker"], r["loader_images_per_cpu_s"]),
        ("baseline: ImageFolder JPEG + torchvision transforms", r["baseline_images_per_s"],
         r["baseline_images_per_s_per_worker"], r["baseline_images_per_cpu_s"]),
    ]  # fmt: skip
    lines = [
        begin,
        "## Data loading: training batches (`alexnet bench data`)",
        "",
        *machine_lines(m, r["command"]),
        f"- {r['images']:,} JPEGs of ImageNet-typical size "
        f"({r['source_jpeg_bytes_per_image'] / 1024:.0f} KiB each) made from scikit-image's "
        "photos; both sides read the same images with "
        f"{r['workers']} worker process(es), batch {r['batch_size']}, timed in steady state "
        f"over {r['epochs']} alternating epochs each.",
        f"- Ours: the prepared store (`alexnet prepare`, {r['encoding']} records, "
        f"{r['store_bytes_per_image'] / 1024:.1f} KiB per image; prepared at "
        f"{r['prepare_images_per_s']:.0f} images/s) read by make_train_loader: random 224 crop, "
        "flip, PCA lighting, mean image subtracted (Sec. 2, 4.1), float32 batches.",
        "- Baseline: torchvision ImageFolder over the JPEGs, RandomCrop(224), "
        "RandomHorizontalFlip, ToTensor, Normalize, DataLoader(shuffle=True).",
        "",
        "| loader | images/s | per worker | per CPU-second |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {a:.0f} | {b:.0f} | {c:.0f} |" for name, a, b, c in rows],
        "",
        f"Ratio: **{r['ratio']:.2f}x** in images/s, {r['ratio_per_cpu_s']:.2f}x per CPU-second "
        "(which counts worker start-up as well).",
        end,
    ]
    return "\n".join(lines)
