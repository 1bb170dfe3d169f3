"""Timing and reporting helpers shared by the benchmark scripts (bench_kernels.py, bench_quality.py)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of repeated measurements of one callable, in microseconds."""

    median_us: float
    p20_us: float
    p80_us: float
    repetitions: int
    host_us: Optional[float] = None  # CUDA: host time to issue one call (median), which can exceed the GPU time


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile: values must not be empty")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples_us: Sequence[float]) -> Timing:
    return Timing(
        median_us=quantile(samples_us, 0.5),
        p20_us=quantile(samples_us, 0.2),
        p80_us=quantile(samples_us, 0.8),
        repetitions=len(samples_us),
    )


def _repetitions_for(estimate_s: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    """As many repetitions as fit the time budget, clamped to [min_reps, max_reps]."""
    if estimate_s <= 0:
        return max_reps
    return max(min_reps, min(max_reps, int(budget_s / estimate_s)))


def time_cpu(fn: Callable[[], object], *, warmup: int = 1, min_reps: int = 3, max_reps: int = 50,
             budget_s: float = 1.0) -> Timing:
    """Wall time (time.perf_counter) of fn, one sample per call, after `warmup` untimed calls."""
    estimate_s = 0.0
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        estimate_s = time.perf_counter() - start
    samples = []
    for _ in range(_repetitions_for(estimate_s, budget_s, min_reps, max_reps)):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return summarize(samples)


def l2_flush_bytes(device: torch.device) -> int:
    """Twice the device's L2 size: writing that many bytes evicts whatever an earlier call cached."""
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
    return 2 * l2_bytes


def time_cuda(fn: Callable[[], object], *, device: torch.device, warmup: int = 3, min_reps: int = 5,
              max_reps: int = 100, budget_s: float = 2.0) -> Timing:
    """CUDA-event time of fn on the current stream, with L2 flushed before every repetition.

    The flush is a write of a buffer larger than L2, enqueued before the start event, so each
    repetition reads its inputs from HBM as a first call inside a model would. Between the flush
    and the start event the GPU spins for longer than the host takes to issue fn, so the events
    time the GPU work of fn, not the host's launches (which Timing.host_us reports).
    """
    flush = torch.empty(l2_flush_bytes(device), dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize(device)
    estimate_s = (time.perf_counter() - start) / max(warmup, 1)
    host_samples = []
    for _ in range(3):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        host_samples.append(time.perf_counter() - start)
    torch.cuda.synchronize(device)
    host_s = quantile(host_samples, 0.5)
    # Cycles at up to 2 GHz, twice the host time, capped at about 2 ms.
    hold_cycles = min(int(4e9 * host_s) + 100_000, 4_000_000)
    repetitions = _repetitions_for(estimate_s, budget_s, min_reps, max_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repetitions)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repetitions)]
    for start_event, end_event in zip(starts, ends):
        flush.zero_()
        torch.cuda._sleep(hold_cycles)
        start_event.record()
        fn()
        end_event.record()
    torch.cuda.synchronize(device)
    timing = summarize([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])
    return dataclasses.replace(timing, host_us=host_s * 1e6)


def time_on(device: torch.device, fn: Callable[[], object], *, quick: bool) -> Timing:
    """The right timer for the device, with repetition budgets for a quick or a full run."""
    if device.type == "cuda":
        if quick:
            return time_cuda(fn, device=device, warmup=2, min_reps=3, max_reps=20, budget_s=0.3)
        return time_cuda(fn, device=device, warmup=5, min_reps=10, max_reps=200, budget_s=2.0)
    if quick:
        return time_cpu(fn, warmup=1, min_reps=3, max_reps=20, budget_s=0.3)
    return time_cpu(fn, warmup=2, min_reps=5, max_reps=100, budget_s=2.0)


def cli_device(choice: Optional[str]) -> torch.device:
    """The device a `--device` option names (default: cuda when available, else cpu)."""
    device = torch.device(choice or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch reports no CUDA device")
    return device


def device_description(device: torch.device) -> str:
    """Human-readable name of the device: GPU name, or the CPU model as lscpu reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def run_metadata(device: torch.device) -> dict:
    """Where, when and how a result was produced, for the JSON and markdown reports."""
    return {
        "device": device_description(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(arg) for arg in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # Other work on the machine skews CPU timings; the 1-minute load average shows how much.
        "load_average_1min": os.getloadavg()[0],
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_number(value: Optional[float], digits: int = 1) -> str:
    """Fixed-point text for a table cell; '-' for a missing value."""
    return "-" if value is None else f"{value:.{digits}f}"


def write_json(path: str, payload: dict) -> None:
    """payload as JSON at path, replaced in one step (a run killed meanwhile leaves the old file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.replace(partial, path)


def load_pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None (with a message) if missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save_figure(pyplot, figure, path: str) -> bool:
    """Write the figure as a PNG and release it; True, as the plot functions report."""
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return True
