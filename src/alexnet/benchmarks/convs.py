"""`alexnet bench convs`: the two convolutions whose speed depends on how they are computed.

- conv2 (Figure 2: each tower's 128 kernels see only its own 48 maps; 27x27, 5x5, pad 2): one
  grouped convolution (groups=2, what the one-device net runs) against two dense convolutions
  on the towers' halves, concatenated (the way a tower-by-tower computation would go);
- conv1 (96 kernels of 11x11x3, stride 4, on 224x224; 3 input maps, an awkward shape for
  channels_last kernels) as one convolution (what the net runs in float32), as two towers of 48
  kernels on the same input, concatenated (the 2012 code's two GPUs), and on the image's 4x4
  blocks (alexnet.fast.SpaceToDepthConv: what the net runs in bf16 on a CPU);
each timed forward + backward (input and weight gradients; conv1's input gradient too, which
training does not need, to keep the two alike), in float32 and in bfloat16 + channels_last,
with cuDNN's algorithm search (cudnn.benchmark, what training sets) off and on. Medians of the
timed repeats, interleaved.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from alexnet.benchmarks.report import machine_info, machine_lines, markers, section_name
from alexnet.errors import BadInput
from alexnet.fast import space_to_depth_conv2d

# name: (input maps, output maps, input side, kernel, stride, pad, groups)
LAYERS = {"conv1": (3, 96, 224, 11, 4, 0, 1), "conv2": (96, 256, 27, 5, 1, 2, 2)}
CONV1 = ["dense", "two towers", "4x4 blocks"]
MODES = {"fp32": (torch.float32, False), "bf16+cl": (torch.bfloat16, True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(layer: str, variant: str, mode: str, batch: int, device: torch.device):
    cin, cout, side, k, stride, pad, groups = LAYERS[layer]
    dtype, cl = MODES[mode]
    fmt = torch.channels_last if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, side, side, generator=g).to(device, dtype)
    w = (torch.randn(cout, cin // groups, k, k, generator=g) * 0.01).to(device, dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    w = w.contiguous(memory_format=fmt).requires_grad_(True)

    def step():
        if variant == "two dense":
            halves = zip(x.chunk(2, 1), w.chunk(2, 0), strict=True)
            y = torch.cat([F.conv2d(xi, wi, None, stride, pad) for xi, wi in halves], 1)
        elif variant == "two towers":  # each tower's 48 kernels on the whole input
            y = torch.cat([F.conv2d(x, wi, None, stride, pad) for wi in w.chunk(2, 0)], 1)
        elif variant == "4x4 blocks":
            y = space_to_depth_conv2d(x, w, None, stride, (pad, pad))
        else:
            y = F.conv2d(x, w, None, stride, pad, 1, groups)
        y.backward(torch.ones_like(y))
        x.grad = w.grad = None

    return step


def run_convs_bench(
    device="cpu", batch_size: int = 256, steps: int = 20, warmup: int = 3, log=print
) -> dict:
    """The timings described in the module docstring; returns what `--json` prints."""
    device = torch.device(device)
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise BadInput("--batch-size and --steps must be positive, --warmup at least 0")
    modes = ["fp32", "bf16+cl"]
    cases = [(layer, variant, mode)
             for layer, variants in (("conv1", CONV1), ("conv2", ["grouped", "two dense"]))
             for variant in variants for mode in modes]  # fmt: skip
    machine = machine_info(device)
    before = torch.backends.cudnn.benchmark
    runs = [(c, search) for search in (False, True) for c in cases]
    step = {run: _case(*run[0], batch_size, device) for run in runs}
    times: dict = {run: [] for run in runs}
    try:
        for rep in range(warmup + steps):
            for run in runs:  # interleaved: load on the machine hits every case alike
                torch.backends.cudnn.benchmark = run[1]  # read by every convolution call
                _sync(device)
                t = time.perf_counter()
                step[run]()
                _sync(device)
                if rep >= warmup:
                    times[run].append(time.perf_counter() - t)
    finally:
        torch.backends.cudnn.benchmark = before
    rows = []
    for ((layer, variant, mode), search), ts in times.items():
        ms = 1000 * statistics.median(ts)
        rows.append({"layer": layer, "variant": variant, "mode": mode, "cudnn_benchmark": search,
                     "ms": ms, "images_per_s": batch_size / (ms / 1000)})  # fmt: skip
    log(f"{len(runs)} cases x {warmup + steps} repeats timed")
    ratios = {}
    for mode in modes:
        for search in (False, True):
            pick = {r["variant"]: r["ms"] for r in rows
                    if r["layer"] == "conv2" and r["mode"] == mode
                    and r["cudnn_benchmark"] == search}  # fmt: skip
            tag = f"{mode.replace('+', '_')}{'_benchmark' if search else ''}"
            ratios[f"conv2_grouped_over_two_dense_{tag}"] = pick["grouped"] / pick["two dense"]
            one = {r["variant"]: r["ms"] for r in rows
                   if r["layer"] == "conv1" and r["mode"] == mode
                   and r["cudnn_benchmark"] == search}  # fmt: skip
            ratios[f"conv1_two_towers_over_dense_{tag}"] = one["two towers"] / one["dense"]
            ratios[f"conv1_blocks_over_dense_{tag}"] = one["4x4 blocks"] / one["dense"]
    return {
        "rows": rows,
        "ratios": ratios,
        "machine": machine,
        "settings": {
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "command": f"alexnet bench convs --batch-size {batch_size} --steps {steps} "
            f"--warmup {warmup}",
        },
    }


def format_table(result: dict) -> str:
    lines = [f"{'layer':<7}{'variant':<11}{'mode':<9}{'cudnn.benchmark':>16}{'ms':>9}", "-" * 52]
    for r in result["rows"]:
        lines.append(f"{r['layer']:<7}{r['variant']:<11}{r['mode']:<9}"
                     f"{str(r['cudnn_benchmark']):>16}{r['ms']:>9.3f}")  # fmt: skip
    lines += [f"{k}: {v:.2f}" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    begin, end = markers(section_name("bench convs", m))
    lines = [
        begin,
        "## conv1 and conv2: how they are computed (`alexnet bench convs`"
        + (f", {m['device']}" if not m["device"].startswith("cpu") else "")
        + ")",
        "",
        *machine_lines(m, s["command"]),
        f"- Forward + backward of one layer, batch {s['batch_size']}, {s['warmup']} warm-up + "
        f"{s['steps']} timed repeats, interleaved; medians. conv2 grouped (groups=2, what the "
        "one-device net runs) against two dense convolutions on the towers' halves; conv1 as one "
        "convolution, as two towers of 48 kernels, and on 4x4 blocks (SpaceToDepthConv).",
        "",
        "| layer | computed as | mode | cudnn.benchmark | ms | images/s |",
        "|---|---|---|---|---:|---:|",
        *[
            f"| {r['layer']} | {r['variant']} | {r['mode']} | {r['cudnn_benchmark']} | "
            f"{r['ms']:.3f} | {r['images_per_s']:.0f} |"
            for r in result["rows"]
        ],  # fmt: skip
        "",
        "| ratio (time) | value |",
        "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()],
        end,
    ]
    return "\n".join(lines)
