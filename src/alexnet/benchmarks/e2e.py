"""`alexnet bench e2e`: end-to-end training throughput, the real loader and the paper net against
a torchvision-style reference loop, on the same JPEGs, in one process.

In a work folder: JPEGs of ImageNet-typical size (`alexnet.benchmarks.data.make_jpegs`, made by
every core), prepared into a store (`alexnet prepare`, every core); then, timed after warm-up
steps (LRN kernels compiled, cuDNN's algorithms chosen):
  - ours: TrainLoader over the store (random crop, flip, PCA lighting, mean image; workers that
    live across epochs), the `paper` net in the device's fastest mode (bfloat16 autocast and
    channels_last on a GPU, speed.default_fast_mode), PaperSGD; once with the records decoded by
    the loader workers (decode "cpu"), and on CUDA once with nvJPEG on the GPU (decode "gpu");
  - the reference: torchvision ImageFolder over the JPEGs, RandomCrop(224), RandomHorizontalFlip,
    ToTensor, Normalize, a DataLoader with the same workers (persistent, pinned), and
    torchvision's AlexNet in float32, SGD with momentum.
A loop's rate counts the images of its timed steps over their wall time (loader waits included).
GPU busy is NVML's utilisation over the timed steps only: the driver's own samples between the
window's start and end where the driver keeps them, else polled every 20 ms in this process.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader

from alexnet.benchmarks.data import make_jpegs
from alexnet.benchmarks.report import machine_info, machine_lines, markers, section_name
from alexnet.config import get_profile
from alexnet.data import TrainLoader, prepare_store
from alexnet.data.loader import gpu_decode_available, measure_decode
from alexnet.devices import available_cpus, select_device
from alexnet.errors import BadInput
from alexnet.model import build_model
from alexnet.optim import make_optimizer
from alexnet.speed import (
    autocast,
    configure_backends,
    default_fast_mode,
    prepare_input,
    prepare_model,
)


def _nvml_handle(pynvml, device: torch.device):
    """NVML's handle of a CUDA device: NVML numbers the GPUs in PCI order, CUDA (by default)
    fastest first and after CUDA_VISIBLE_DEVICES, so the PCI address is the sure match."""
    props = torch.cuda.get_device_properties(device)
    try:
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except Exception:  # a torch without the PCI fields: the index (right with one GPU)
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


class GpuBusy:
    """Mean GPU utilisation (percent of time a kernel ran) between __enter__ and __exit__, from
    NVML in this process; `percent` is None without NVML or off CUDA."""

    def __init__(self, device: torch.device, poll_s: float = 0.02):
        self.device, self.poll_s = torch.device(device), poll_s
        self.percent: float | None = None
        self.method = "none"
        self.samples = 0
        self._nvml = self._handle = None
        self._polled: list[float] = []
        self._stop = threading.Event()
        if self.device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, self.device)
            self._nvml = pynvml
        except Exception:  # no nvidia-ml-py, no driver library: no figure, not a failure
            self._nvml = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                rate = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                self._polled.append(float(rate.gpu))
            except Exception:
                return

    def __enter__(self):
        self._t0 = time.time()
        self._stop.clear()
        self._polled = []
        self.percent, self.samples, self.method = None, 0, "none"
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        t1 = time.time()
        if self._nvml is None:
            return
        self._stop.set()
        self._thread.join()
        values = []
        try:  # the driver's samples (microsecond time stamps) inside the window
            nv = self._nvml
            _, samples = nv.nvmlDeviceGetSamples(
                self._handle, nv.NVML_GPU_UTILIZATION_SAMPLES, int(self._t0 * 1e6)
            )
            values = [
                float(s.sampleValue.uiVal)
                for s in samples
                if self._t0 * 1e6 <= s.timeStamp <= t1 * 1e6
            ]
        except Exception:
            values = []
        if len(values) >= 3:
            self.method, data = "nvml samples", values
        else:
            self.method, data = f"nvml polled every {self.poll_s * 1000:.0f} ms", self._polled
        if data:
            self.percent, self.samples = float(np.mean(data)), len(data)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(batches, step, steps: int, warmup: int, device: torch.device) -> dict:
    """images/s and GPU busy % over `steps` steps after `warmup` steps (loader included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    _sync(device)
    n = 0
    with GpuBusy(device) as busy:
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(it)
            step(x, y)
            n += len(y)
        _sync(device)
        seconds = time.perf_counter() - t0
    return {
        "images_per_s": n / seconds,
        "seconds": seconds,
        "gpu_busy_percent": busy.percent,
        "gpu_busy_method": busy.method,
        "gpu_busy_samples": busy.samples,
    }


def _ours(store, device, batch, steps, warmup, workers, decode, seed) -> dict:
    profile = get_profile("paper")
    mode = default_fast_mode(device)
    torch.manual_seed(seed)
    model = build_model(profile, num_classes=store.num_classes, devices=[device])
    model = prepare_model(model, mode)
    opt = make_optimizer(model, profile.train)
    loader = TrainLoader(
        store, profile.data, batch, seed, workers=workers, device=device, decode=decode
    )

    def step(x, y):
        with autocast(mode, device):
            out = model(prepare_input(x, mode))
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches():
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    try:
        r = timed_loop(batches(), step, steps, warmup, device)
    finally:
        loader.close()
    return r | {"loop": "ours", "decode": loader.decode, "mode": mode.label}


def _reference(folder, classes, device, batch, steps, warmup, workers, seed) -> dict:
    tf = T.Compose(
        [
            T.RandomCrop(224, pad_if_needed=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(folder), tf)
    dl = DataLoader(
        ds,
        batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    torch.manual_seed(seed)
    model = torchvision.models.alexnet(num_classes=classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        out = model(x.to(device, non_blocking=True))
        loss = F.cross_entropy(out, y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def batches():
        while True:
            yield from dl

    r = timed_loop(batches(), step, steps, warmup, device)
    return r | {"loop": "reference", "decode": "cpu", "mode": "fp32"}


def run_e2e(
    images: int = 20000,
    steps: int = 200,
    warmup: int = 20,
    batch_size: int = 256,
    workers: int | None = None,
    device="cpu",
    decodes: tuple[str, ...] | None = None,
    work_dir: str | None = None,
    seed: int = 0,
    log=print,
) -> dict:
    """The measurement described in the module docstring; returns the JSON `--json` prints."""
    device = torch.device(device)
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise BadInput("--steps and --batch-size must be positive, --warmup at least 0")
    cores = available_cpus()
    workers = max(1, cores - 1) if workers is None else workers
    if decodes is None:
        decodes = ("cpu", "gpu") if device.type == "cuda" and gpu_decode_available() else ("cpu",)
    for d in decodes:
        if d not in ("cpu", "gpu"):
            raise BadInput(f"unknown decode {d!r}: cpu or gpu")
    with tempfile.TemporaryDirectory(prefix="alexnet-e2e-", dir=work_dir) as tmp:
        src, store_dir = Path(tmp) / "jpegs", Path(tmp) / "store"
        t0 = time.perf_counter()
        jpeg_bytes = make_jpegs(src, images, seed=seed, workers=cores)
        make_s = time.perf_counter() - t0
        log(f"made {images} JPEGs with {cores} processes in {make_s:.1f} s")
        t0 = time.perf_counter()
        store = prepare_store(src, store_dir, kind="folder", val_fraction=0.05, workers=cores,
                              progress=False, log=lambda *a: None)  # fmt: skip
        prep_s = time.perf_counter() - t0
        log(f"prepared the store in {prep_s:.1f} s")
        # CUDA only now: the JPEG and prepare pools fork, better from a process without CUDA's
        # threads.
        select_device(device)
        configure_backends(device)
        machine = machine_info(device)
        if batch_size > store.size("train"):
            raise BadInput(f"--batch-size {batch_size} is more than the {store.size('train')} "
                           "training images: make more --images")  # fmt: skip
        auto = None
        if device.type == "cuda" and gpu_decode_available():
            auto = measure_decode(store, device, workers)
        rows = []
        for d in decodes:
            log(f"ours, decode {d}: {warmup} warm-up + {steps} timed steps of {batch_size}")
            rows.append(_ours(store, device, batch_size, steps, warmup, workers, d, seed))
            log(f"  {rows[-1]['images_per_s']:.0f} images/s")
        log(f"reference loop: {warmup} warm-up + {steps} timed steps of {batch_size}")
        rows.append(_reference(src, store.num_classes, device, batch_size, steps, warmup,
                               workers, seed))  # fmt: skip
        log(f"  {rows[-1]['images_per_s']:.0f} images/s")
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    ref = rows[-1]["images_per_s"]
    ours = {r["decode"]: r for r in rows if r["loop"] == "ours"}
    chosen = (auto or {}).get("decode", "cpu")
    result = {
        "rows": rows,
        "ratio_best": max(r["images_per_s"] for r in ours.values()) / ref,
        "ratio_auto": ours[chosen]["images_per_s"] / ref if chosen in ours else None,
        "decode_auto": auto,
        "machine": machine,
        "settings": {
            "images": images,
            "steps": steps,
            "warmup": warmup,
            "batch_size": batch_size,
            "workers": workers,
            "cores": cores,
            "decodes": list(decodes),
            "jpeg_bytes_per_image": jpeg_bytes / images,
            "make_jpegs_s": make_s,
            "prepare_s": prep_s,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        },
    }
    result["settings"]["command"] = (
        f"alexnet bench e2e --images {images} --steps {steps} --warmup {warmup} "
        f"--batch-size {batch_size} --workers {workers} --decode {','.join(decodes)}"
    )
    return result


def _busy(r: dict) -> str:
    p = r["gpu_busy_percent"]
    return "n/a" if p is None else f"{p:.0f}%"


def format_table(result: dict) -> str:
    lines = [f"{'loop':<72}{'images/s':>10}{'GPU busy':>10}", "-" * 92]
    for r in result["rows"]:
        lines.append(f"{_label(r):<72}{r['images_per_s']:>10.0f}{_busy(r):>10}")
    lines.append(f"ratio (best of ours / reference): {result['ratio_best']:.2f}x")
    if result["decode_auto"]:
        a = result["decode_auto"]
        lines.append(
            f"decode auto: {a['decode']} (GPU {a['gpu_images_per_s']:.0f} images/s, "
            f"{a['workers']} workers at most {a['cpu_images_per_s']:.0f})"
        )
    return "\n".join(lines)


def _label(r: dict) -> str:
    if r["loop"] == "reference":
        return "reference: ImageFolder JPEG + torchvision AlexNet, fp32"
    where = "GPU (nvJPEG)" if r["decode"] == "gpu" else "loader workers"
    return f"ours: store + TrainLoader + paper, {r['mode']}, decode on {where}"


def format_markdown(result: dict) -> str:
    """The result as a BENCHMARKS.md section."""
    m, s = result["machine"], result["settings"]
    begin, end = markers(section_name("bench e2e", m))
    lines = [
        begin,
        "## End-to-end training throughput (`alexnet bench e2e`"
        + (f", {m['device']}" if not m["device"].startswith("cpu") else "")
        + ")",
        "",
        *machine_lines(m, s["command"]),
        f"- {s['images']:,} JPEGs of ImageNet-typical size "
        f"({s['jpeg_bytes_per_image'] / 1024:.0f} KiB each) made from scikit-image's photos in "
        f"{s['make_jpegs_s']:.0f} s and prepared into a store in {s['prepare_s']:.0f} s "
        f"({s['cores']} cores); {s['warmup']} warm-up + {s['steps']} timed training steps of "
        f"{s['batch_size']} per loop, {s['workers']} loader workers for both; cudnn.benchmark "
        f"{s['cudnn_benchmark']}.",
        "- GPU busy: NVML utilisation over the timed steps only (sampled in the process).",
        "",
        "| loop | images/s | GPU busy |",
        "|---|---:|---:|",
        *[f"| {_label(r)} | {r['images_per_s']:.0f} | {_busy(r)} |" for r in result["rows"]],
        "",
        f"Ratio: **{result['ratio_best']:.2f}x** (the faster of ours against the reference).",
    ]
    if result["decode_auto"]:
        a = result["decode_auto"]
        lines.append(
            f"`decode=auto` chose **{a['decode']}** here (GPU {a['gpu_images_per_s']:.0f} "
            f"images/s against at most {a['cpu_images_per_s']:.0f} from {a['workers']} workers)."
        )
    lines.append(end)
    return "\n".join(lines)
