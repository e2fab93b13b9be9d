"""What every benchmark records with its numbers, and how BENCHMARKS.md is written: the machine
(`machine_info`), and one Markdown section per benchmark and device kind, each written by its
command's `--markdown FILE` between begin/end markers, so that a rerun replaces its own section
only."""

from __future__ import annotations

import datetime
import os
import platform

import torch

from alexnet.errors import BadInput
from alexnet.speed import cpu_has_bf16


def machine_info(device: torch.device) -> dict:
    """What ran the benchmark: CPU model, cores, torch version, date (and the GPU, if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def section_name(what: str, machine: dict) -> str:
    """The name of a BENCHMARKS.md section: one per benchmark and device kind, so that a GPU
    run adds its sections beside the CPU's instead of replacing them."""
    device = machine.get("device", "cpu")
    return what if device.startswith("cpu") else f"{what} ({device.split(':')[0]})"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- alexnet {name}: begin -->", f"<!-- alexnet {name}: end -->"


def machine_lines(m: dict, command: str) -> list[str]:
    """The machine, software, date, load and command of a run, as Markdown list items."""
    return [
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"native bf16: {m['cpu_bf16']}; device {m['device']}"
        + (f" ({m['gpu']}, CUDA {m['cuda']})" if "gpu" in m else ""),
        f"- torch {m['torch']}, Python {m['python']}; date {m['date']}; load average "
        f"{m.get('loadavg_start')} -> {m.get('loadavg_end')} "
        "(1, 5, 15 min; the benchmark's own threads count)",
        f"- Command: `{command}`",
    ]


def check_markdown_path(path: str | None) -> None:
    """Fail before a benchmark runs, not after, when its --markdown file cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise BadInput(f"--markdown {path}: no folder {folder}")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise BadInput(f"--markdown {path}: not a writable file")


def write_section(path: str, section: str) -> None:
    """Write a section (from its begin marker to its end marker) into the Markdown file `path`,
    replacing the earlier section of the same name if there is one, else appending it."""
    begin, end = section.splitlines()[0], section.splitlines()[-1]
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n\nEvery figure here is written by `alexnet bench`.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)
