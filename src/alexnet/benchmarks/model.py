"""`alexnet bench model`: training-step and inference speed of every profile against
torchvision's AlexNet.

It times, in one process and interleaved (A B C A B C ...: background load hits every
configuration alike), for every (network, mode) pair:
  - a training step: forward, cross-entropy in float32, backward, SGD with momentum (the same
    optimiser for every network), on a synthetic batch (the loader is `bench data`'s business);
  - inference: a forward pass in eval mode under torch.inference_mode().
Each figure is the median over the timed repeats after warm-up steps. FLOP/s count 2 FLOPs per
multiply-add of the convolutions and matrix products (torch.utils.flop_counter), 3x the forward
pass per trained image (forward, and the backward's two products per layer), set against the
machine's matrix peak: a large matmul measured in the same run (the best of samples taken
before, during and after the timed steps).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from alexnet import fast, lrn, lrn_pool
from alexnet.benchmarks.report import (
    machine_info,
    machine_lines,
    markers,
    section_name,
    write_section,
)
from alexnet.config import get_profile
from alexnet.errors import BadInput
from alexnet.model import build_model
from alexnet.speed import (
    FastMode,
    autocast,
    configure_backends,
    cpu_has_bf16,
    default_fast_mode,
    maybe_compile,
    prepare_input,
    tune_cpu_allocator,
)

DEFAULT_PROFILES = ("paper", "cuda-convnet", "caffe", "torchvision")
BASELINE = "torchvision"


@dataclass
class _Config:
    """One (network, mode) pair under test."""

    profile: str
    mode: object  # speed.FastMode
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    runner: torch.nn.Module  # the model, or its torch.compile wrapper
    x: torch.Tensor
    y: torch.Tensor
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    infer_s: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product: the machine's practical matrix peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernels
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass through the convs and matmuls."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _input_size(profile: str) -> int:
    p = get_profile(profile)
    return 224 if p.model.layout == "torchvision" else p.model.input_size


def _train_step(cfg: _Config, device: torch.device) -> None:
    cfg.optimizer.zero_grad(set_to_none=True)
    with autocast(cfg.mode, device):
        out = cfg.runner(cfg.x)
    loss = F.cross_entropy(out.float(), cfg.y)  # the loss in float32, as the trainer does
    loss.backward()
    cfg.optimizer.step()
    cfg.optimizer.zero_grad(set_to_none=True)  # free the gradients while the others run


def _infer(cfg: _Config, device: torch.device) -> None:
    with torch.inference_mode(), autocast(cfg.mode, device):
        cfg.runner(cfg.x)


def _set_format(cfg: _Config, current: dict) -> None:
    # One model per network serves every mode: switch its conv weights' memory format (a few
    # MB) when the mode changes, rather than hold one copy of the 61M parameters per mode.
    want = torch.channels_last if cfg.mode.channels_last else torch.contiguous_format
    if current.get(cfg.profile) != want:
        cfg.model.to(memory_format=want)
        current[cfg.profile] = want


def available_modes(device: torch.device, compile: bool = False) -> list[str]:
    """The modes worth measuring here: fp32 and bf16 (where the hardware has it), each in the
    default and the channels_last memory format; +compile variants on request."""
    modes = ["fp32", "fp32+cl"]
    if device.type == "cuda" or cpu_has_bf16():
        modes += ["bf16", "bf16+cl"]
    if compile:
        modes += [default_fast_mode(device).label + "+compile"]
    return modes


def run_model_bench(
    profiles=DEFAULT_PROFILES,
    modes: list[str] | None = None,
    batch_size: int = 128,
    steps: int = 5,
    warmup: int = 2,
    infer_steps: int | None = None,
    num_classes: int = 1000,
    device: str | torch.device = "cpu",
    peak_size: int = 2048,
    tune_allocator: bool = True,
    fuse: bool = True,
    seed: int = 0,
    log=print,
) -> dict:
    """Training and inference images/s of every (profile, mode), interleaved; see the module
    docstring. Returns the object `alexnet bench model --json` prints."""
    device = torch.device(device)
    if not profiles:
        raise BadInput("no profiles to measure")
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise BadInput("--batch-size and --steps must be positive, --warmup at least 0")
    for p in profiles:
        get_profile(p)  # a clear error for an unknown profile
    if not profiles:
        raise BadInput("no profiles to measure")
    modes = list(modes) if modes else available_modes(device)
    parsed = [FastMode.from_label(m) for m in modes]
    tuned = tune_cpu_allocator() if (tune_allocator and device.type == "cpu") else False
    configure_backends(device)  # as training does: cudnn.benchmark on CUDA
    infer_steps = steps if infer_steps is None else infer_steps
    machine = machine_info(device)

    # The matrix peak: sampled at the start, after every training pass and at the end, the
    # highest kept (background load only ever lowers a sample).
    peak_dtypes = {"fp32": torch.float32}
    if any(m.autocast_dtype == "bfloat16" for m in parsed):
        peak_dtypes["bf16"] = torch.bfloat16
    peak = {k: 0.0 for k in peak_dtypes}

    def sample_peak(repeats: int) -> None:
        for k, dt in peak_dtypes.items():
            peak[k] = max(peak[k], matmul_peak(device, dt, peak_size, repeats))

    sample_peak(10)

    torch.manual_seed(seed)
    inputs = {}
    for size in sorted({_input_size(p) for p in profiles}):
        inputs[size] = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)

    configs: list[_Config] = []
    for profile in profiles:
        # The fast form (alexnet.fast.fuse), as `alexnet train` runs it; unfused on request.
        model = build_model(profile, num_classes=num_classes, devices=[device]).train()
        if fuse:
            fast.fuse(model)
        # The same optimiser for every network: SGD with momentum (Sec. 5's hyper-parameters;
        # lr kept small so that the random batches do not blow the weights up mid-benchmark).
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
        for mode in parsed:
            x = prepare_input(inputs[_input_size(profile)], mode)
            runner = maybe_compile(model, mode)
            configs.append(_Config(profile, mode, model, opt, runner, x, labels))

    log(
        f"bench model: {len(configs)} configurations x ({warmup} warm-up + {steps} timed) "
        f"training steps, batch {batch_size}, on {device} ({machine['cpu']}, "
        f"{machine['cores']} cores, torch {machine['torch']})"
    )
    fmt: dict = {}
    for rep in range(warmup + steps):
        for cfg in configs:
            _set_format(cfg, fmt)
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            _train_step(cfg, device)
            _sync(device)
            if rep >= warmup:
                cfg.step_s.append(time.perf_counter() - t)
                cfg.step_cpu_s.append(time.process_time() - c)
        label = "warm-up" if rep < warmup else "timed"
        log(f"  training pass {rep + 1}/{warmup + steps} ({label}) done")
        sample_peak(3)
    for cfg in configs:
        cfg.model.eval()
    for rep in range(1 + infer_steps):
        for cfg in configs:
            _set_format(cfg, fmt)
            _sync(device)
            t = time.perf_counter()
            _infer(cfg, device)
            _sync(device)
            if rep >= 1:
                cfg.infer_s.append(time.perf_counter() - t)
    for cfg in configs:
        cfg.model.train()

    sample_peak(10)
    flops = {}
    for cfg in configs:
        if cfg.profile not in flops:
            flops[cfg.profile] = forward_flops(cfg.model, _input_size(cfg.profile))

    rows = []
    for cfg in configs:
        train_s = statistics.median(cfg.step_s)
        train_ips = batch_size / train_s
        achieved = train_ips * 3 * flops[cfg.profile]
        ref_dtype = "bf16" if cfg.mode.autocast_dtype == "bfloat16" else "fp32"
        ref_peak = peak[ref_dtype]
        rows.append(
            {
                "model": cfg.profile,
                "mode": cfg.mode.label,
                "train_images_per_s": train_ips,
                "train_images_per_s_best": batch_size / min(cfg.step_s),
                "infer_images_per_s": batch_size / statistics.median(cfg.infer_s),
                "cpu_ms_per_train_image": 1000 * statistics.median(cfg.step_cpu_s) / batch_size,
                "train_gflops": achieved / 1e9,
                "fraction_of_matmul_peak": achieved / ref_peak,
                # The peak each row is a fraction of: this machine's matmul in the row's dtype.
                "matmul_peak_dtype": ref_dtype,
                "matmul_peak_gflops": ref_peak / 1e9,
                "train_step_s": [round(s, 4) for s in cfg.step_s],
            }
        )
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    return {
        "rows": rows,
        "ratios": ratios(rows),
        "fastest": fastest(rows),
        "machine": machine,
        "peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "forward_gflops_per_image": {p: f / 1e9 for p, f in flops.items()},
        "settings": {
            "batch_size": batch_size,
            "peak_size": peak_size,
            "steps": steps,
            "warmup": warmup,
            "num_classes": num_classes,
            "modes": [m.label for m in parsed],
            "allocator_tuned": tuned,
            "optimizer": "SGD(lr=1e-4, momentum=0.9, weight_decay=5e-4)",
            "lrn_backend": _lrn_backend(),
            "fused": fuse,  # alexnet.fast.fuse applied to the two-tower nets
            "lrn_pool_kernel": lrn_pool.available() if fuse else False,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) and device.type == "cuda",
        },
    }


def _lrn_backend() -> str:
    return lrn.get_backend()


def _find(rows, model, mode):
    for r in rows:
        if r["model"] == model and r["mode"] == mode:
            return r
    return None


def _best(rows, model, precision: str | None = None):
    """The row of `model` with the most training images/s (of one precision, if given)."""
    best = None
    for r in rows:
        if r["model"] != model or (precision and r["mode"].split("+")[0] != precision):
            continue
        if best is None or r["train_images_per_s"] > best["train_images_per_s"]:
            best = r
    return best


def fastest(rows) -> dict:
    """The fastest mode of each network (by training images/s)."""
    return {r["model"]: _best(rows, r["model"])["mode"] for r in rows}


def ratios(rows) -> dict:
    """Training (and inference) images/s of each network against torchvision's AlexNet in
    float32 as torchvision ships it (mode "fp32": NCHW, no autocast, no compile).

    <net>_fp32_vs_torchvision_fp32: the net in float32 as this project runs it, i.e. its
        faster float32 memory format (channels_last on CPUs, see speed.py);
    fastest_vs_torchvision_fp32 (paper) / <net>_fastest_vs_torchvision_fp32: its fastest mode;
    paper_vs_torchvision_same_mode_<mode>: both networks in the same mode (fp32: both NCHW,
        fp32_cl: both channels_last, ...), the like-for-like comparisons.
    """
    out: dict[str, float] = {}
    base = _find(rows, BASELINE, "fp32")
    if base is None:
        return out
    b = base["train_images_per_s"]
    for model in dict.fromkeys(r["model"] for r in rows):
        key = model.replace("-", "_")
        fp32 = _best(rows, model, "fp32")
        if model != BASELINE and fp32 is not None:
            out[f"{key}_fp32_vs_{BASELINE}_fp32"] = fp32["train_images_per_s"] / b
        top = _best(rows, model)
        name = "fastest" if model == "paper" else f"{key}_fastest"
        out[f"{name}_vs_{BASELINE}_fp32"] = top["train_images_per_s"] / b
    for r in rows:
        if r["model"] != "paper":
            continue
        other = _find(rows, BASELINE, r["mode"])
        if other is not None:
            tag = r["mode"].replace("+", "_")
            out[f"paper_vs_{BASELINE}_same_mode_{tag}"] = (
                r["train_images_per_s"] / other["train_images_per_s"]
            )
    paper_fp32 = _best(rows, "paper", "fp32")
    if paper_fp32 is not None:
        out[f"paper_infer_fp32_vs_{BASELINE}_infer_fp32"] = (
            paper_fp32["infer_images_per_s"] / base["infer_images_per_s"]
        )
    return out


def format_table(result: dict) -> str:
    """The result as a plain-text table (and the ratios under it)."""
    # Beside img/s, what carries to another machine: the step's GFLOP/s as a fraction of this
    # machine's own matrix-multiply rate, measured in the same run, in the row's dtype.
    head = (
        f"{'model':<14}{'mode':<18}{'train img/s':>12}{'best':>8}{'infer img/s':>13}"
        f"{'CPU ms/img':>12}{'GFLOP/s':>9}{'matmul GFLOP/s':>16}{'fraction':>10}"
    )
    lines = [head, "-" * len(head)]
    peak_of = result["peak_gflops"]
    for r in result["rows"]:
        dtype = r.get("matmul_peak_dtype", "fp32")  # results written before it was recorded
        matmul = f"{dtype} {r.get('matmul_peak_gflops', peak_of.get(dtype, 0)):.0f}"
        lines.append(
            f"{r['model']:<14}{r['mode']:<18}{r['train_images_per_s']:>12.1f}"
            f"{r['train_images_per_s_best']:>8.1f}{r['infer_images_per_s']:>13.1f}"
            f"{r['cpu_ms_per_train_image']:>12.1f}{r['train_gflops']:>9.1f}"
            f"{matmul:>16}{100 * r['fraction_of_matmul_peak']:>9.0f}%"
        )
    m, s = result["machine"], result["settings"]
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak_of.items())
    lines.append("")
    lines.append(
        f"fraction: the training step's GFLOP/s over this machine's {s.get('peak_size', 2048)}^3 "
        f"matmul, measured in the same run ({peaks}); batch {s['batch_size']}, {s['steps']} "
        "timed steps"
    )
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.2f}x")
    lines.append(f"fastest modes: {', '.join(f'{k} {v}' for k, v in result['fastest'].items())}")
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}, "
        f"load {m.get('loadavg_start')} -> {m.get('loadavg_end')}"
    )
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The result as a Markdown section (machine, date, command, table, ratios)."""
    m, s = result["machine"], result["settings"]
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["peak_gflops"].items())
    loop = s.get("loop", "tuned")
    batch = "" if s["batch_size"] == 128 else f", batch {s['batch_size']}"
    begin, end = markers(section_name(f"bench model, {loop} loop{batch}", m))
    what = {
        "plain": "a plain loop: torch.optim.SGD, glibc's malloc as it is (what a user's own "
        "script gets)",
        "tuned": "the allocator tuned (alexnet.speed.tune_cpu_allocator, as `alexnet train` does)",
    }[loop]
    lines = [
        begin,
        "## Model speed: training step and inference (`alexnet bench model`"
        + (f", {m['device']}" if not m["device"].startswith("cpu") else "")
        + f"), {what}",
        "",
        *machine_lines(m, s.get("command", "alexnet bench model")),
        f"- Batch {s['batch_size']}, {s['warmup']} warm-up + {s['steps']} timed steps per "
        f"configuration, interleaved; medians. Optimiser {s['optimizer']}. Allocator tuned: "
        f"{s['allocator_tuned']}. Matrix peak (same run): {peaks}.",
        "- Baseline: torchvision.models.alexnet() in float32 as torchvision ships it (`fp32`).",
        "- The two-tower nets: "
        + (
            "their fast form, `alexnet.fast.fuse(build_model(...))`, as `alexnet train` runs "
            f"them (fused ReLU-LRN-pool operator loaded: {s.get('lrn_pool_kernel')})."
            if s.get("fused", True)
            else "the plain network, `build_model(...)` (`--unfused`)."
        ),
        "- Modes: `cl` = channels_last input (and conv weights); `bf16` = bfloat16 autocast. "
        "GFLOP/s count 3x the forward pass's multiply-adds x 2 (conv1 needs no input "
        "gradient, so this overstates the work by ~5%): near or above 100% of the measured "
        "2048^3 matmul means the step runs at the practical matrix peak.",
        "",
        "| model | mode | train img/s | infer img/s | CPU ms per train img | train GFLOP/s "
        "| matmul GFLOP/s (same run) | of matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        dtype = r.get("matmul_peak_dtype", "fp32")
        matmul = r.get("matmul_peak_gflops", result["peak_gflops"].get(dtype, 0))
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['train_images_per_s']:.1f} | "
            f"{r['infer_images_per_s']:.1f} | {r['cpu_ms_per_train_image']:.1f} | "
            f"{r['train_gflops']:.0f} | {dtype} {matmul:.0f} | "
            f"{100 * r['fraction_of_matmul_peak']:.0f}% |"
        )
    lines += ["", "| ratio (training images/s) | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in result["ratios"].items()]
    lines.append(end)
    return "\n".join(lines)


def write_markdown(path: str, result: dict) -> None:
    """Write `bench model`'s section into `path`, replacing an earlier one if any."""
    write_section(path, format_markdown(result))
