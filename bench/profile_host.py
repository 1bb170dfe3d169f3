"""Where does the HOST time of one `lightkv_ext.compress_varlen` call go?

    python bench/profile_host.py [--presets video llava_next] [--device cpu|cuda] [--verbatim]

On an H100 a `compress_varlen` call of the packed bench presets cost ~1.2 ms of host time (10
syncs, a dozen small torch ops) until its shape-only tables were cached; `bench/gpu_check.sh`
runs this script to keep that visible. For each preset this script builds
the inputs exactly as bench/bench_kernels.py does (its PRESETS, make_case and varlen_call), warms
up, then prints, per compress_varlen call:

1. host time: median (p10/p90) of perf_counter around one call, torch.cuda.synchronize() before
   each (so the GPU queue is empty when the call starts), and the same for the dense `compress`
   on llava15 at batch 1 for comparison;
2. CUDA only: every call that synchronises the host with the GPU, as the Python line that issued
   it (torch.cuda.set_sync_debug_mode("warn"): .item(), .tolist(), blocking H2D/D2H copies,
   stream synchronisation, also when issued inside a native op);
3. cProfile over 20 calls: top functions by tottime and by cumtime, in µs per call (builtins such
   as torch.tensor or Tensor.tolist show their main caller after "<-"; a builtin's time includes
   any GPU wait it blocks on);
4. torch.profiler (CPU + CUDA activities) over 5 calls: top host events by self CPU time, per call,
   which shows the aten ops and the CUDA runtime calls (cudaMemcpyAsync, cudaStreamSynchronize,
   cudaLaunchKernel...). --verbatim also prints key_averages().table(...) as is (wide).

The output is plain text, about 5,000 characters per preset. On CPU the CUDA-only parts are
skipped, so the script can be tried anywhere; the host times are then the whole CPU compute.
"""
from __future__ import annotations

import argparse
import cProfile
import linecache
import os
import pstats
import re
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from typing import Callable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]  # bench_kernels (and its _timing), then this tree's lightkv_ext

import torch  # noqa: E402

import lightkv_ext  # noqa: E402
from _timing import cli_device, device_description  # noqa: E402
from bench_kernels import PRESETS, dense_call, make_case, varlen_call  # noqa: E402

TIMED_CALLS, CPROFILE_CALLS, TORCH_PROFILER_CALLS, WARMUP_CALLS = 50, 20, 5, 5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_times_us(fn: Callable, device: torch.device, calls: int = TIMED_CALLS) -> List[float]:
    """Host time of each call, the GPU idle at its start."""
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    sync(device)
    return times


def summary(times: Sequence[float]) -> str:
    deciles = statistics.quantiles(times, n=10)
    return f"{statistics.median(times):8.1f} µs (p10 {deciles[0]:.1f}, p90 {deciles[-1]:.1f}, n={len(times)})"


def short_path(path: str) -> str:
    """A file path relative to this repository, or from the package dir for site-packages."""
    if path.startswith(ROOT):
        return os.path.relpath(path, ROOT)
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep, "lib" + os.sep + "python"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def where(func: tuple) -> str:
    """pstats function key (file, line, name) as 'file:line(name)', builtins by name only."""
    file, line, name = func
    if file != "~":
        return f"{short_path(file)}:{line}({name})"
    name = name.strip("<>")  # "method 'tolist' of 'torch._C.TensorBase' objects" -> "Tensor.tolist"
    method = re.fullmatch(r"method '(\w+)' of '([\w.]+)' objects", name)
    if method:
        owner = method.group(2).rsplit(".", 1)[-1]
        return ("Tensor" if owner == "TensorBase" else owner) + "." + method.group(1)
    name = name.replace("built-in method ", "")
    return "torch.ops.lightkv.* (native op)" if name.startswith("torch._ops.lightkv") else name


def print_cprofile(fn: Callable, device: torch.device, calls: int, top: int) -> None:
    profiler = cProfile.Profile()
    sync(device)
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    sync(device)
    stats = pstats.Stats(profiler).stats  # {func: (primitive calls, calls, tottime, cumtime, callers)}
    rows = [(func, nc, tt, ct, callers) for func, (cc, nc, tt, ct, callers) in stats.items()
            if not where(func).startswith(("bench/profile_host.py", "Profiler.disable"))]
    for title, column in (("tottime", 2), ("cumtime", 3)):
        print(f"  cProfile, {calls} calls, top {top} by {title} (µs per call; calls per call):")
        print(f"  {'tottime':>8} {'cumtime':>8} {'calls':>6}  function")
        for func, nc, tt, ct, callers in sorted(rows, key=lambda r: -r[column])[:top]:
            caller = ""
            if func[0] == "~" and callers:  # builtins: name the caller that spent the most in it
                main = max(callers.items(), key=lambda item: item[1][3])[0]
                caller = f"  <- {short_path(main[0]).rsplit(os.sep, 1)[-1]}:{main[2]}"
            print(f"  {tt / calls * 1e6:8.1f} {ct / calls * 1e6:8.1f} {nc / calls:6.1f}  {where(func)}{caller}"[:118])


def sync_points(fn: Callable) -> Counter:
    """Python lines that issued a warning about a synchronising CUDA operation while fn ran: the
    innermost frame in this repository outside this script (the lightkv_ext line for a sync
    inside a native op, which warns from C++ too)."""
    points: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if f.filename.startswith(ROOT) and not f.filename.startswith(os.path.abspath(__file__))]
        frame = frames[-1] if frames else traceback.FrameSummary(filename, lineno, "?")
        points[f"{short_path(frame.filename)}:{frame.lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        fn()
    return points


def print_sync_points(fn: Callable, device: torch.device) -> None:
    """Each host<->GPU synchronisation of one call, as the Python line that issued it."""
    if device.type != "cuda":
        print("  sync points: skipped (CUDA only)")
        return
    sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        points = sync_points(fn)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sync(device)
    print(f"  sync points in one call (torch.cuda.set_sync_debug_mode): {sum(points.values())}")
    for place, count in points.items():
        file, lineno = place.rsplit(":", 1)
        source = linecache.getline(os.path.join(ROOT, file), int(lineno)).strip()
        print(f"    x{count} {place}  {source}"[:118])


def print_torch_profiler(fn: Callable, device: torch.device, calls: int, top: int, verbatim: bool) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    averages = prof.key_averages()
    on_cuda = device.type == "cuda"
    events = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:top]
    print(f"  torch.profiler, {calls} calls, top {top} host events by self CPU (µs per call; calls per call):")
    print(f"  {'selfCPU':>8} {'CPUtot':>8} {'calls':>6}" + (f" {'selfGPU':>8}" if on_cuda else "") + "  name")
    for e in events:
        self_gpu = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        gpu = f" {self_gpu / calls:8.1f}" if on_cuda else ""
        print(f"  {e.self_cpu_time_total / calls:8.1f} {e.cpu_time_total / calls:8.1f} {e.count / calls:6.1f}{gpu}"
              f"  {e.key[:70]}")
    if verbatim:
        print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


def guarded(section: Callable, *args) -> None:
    """Run one section; a failure is printed and the later sections still run (one GPU try)."""
    try:
        section(*args)
    except Exception as error:  # noqa: BLE001
        print(f"  {getattr(section, '__name__', 'section')} failed: {type(error).__name__}: {error}"[:300])


def profile_preset(name: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
    preset = PRESETS[name]
    case = make_case(preset, 1, dtype, device)
    fn = varlen_call(case) if preset.varlen else dense_call(lightkv_ext.compress, case)
    api = "compress_varlen" if preset.varlen else "compress"
    windows = sum(preset.windows ** 2 for _ in preset.grids)
    print(f"\n=== {name} ({preset.model}): {len(preset.grids)} images, {case.vision_tokens} tokens, "
          f"{windows} windows, heads {preset.query_heads}/{preset.kv_heads}, D={preset.head_dim}, {api} ===")
    for _ in range(WARMUP_CALLS):
        fn()
    sync(device)
    guarded(lambda: print(f"  host time per {api} call: {summary(host_times_us(fn, device))}"))
    guarded(print_sync_points, fn, device)
    guarded(print_cprofile, fn, device, CPROFILE_CALLS, args.top)
    guarded(print_torch_profiler, fn, device, TORCH_PROFILER_CALLS, args.top, args.verbatim)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["video", "llava_next"])
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on cuda, float32 on cpu (as bench_kernels.py)")
    parser.add_argument("--top", type=int, default=20, help="rows per ranking (default 20)")
    parser.add_argument("--verbatim", action="store_true",
                        help="also print torch.profiler's own key_averages().table(...) (wide)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = cli_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    print(f"profile_host: {device_description(device)}, torch {torch.__version__}, {dtype}, batch 1, ratio 0.5 "
          f"(host time: perf_counter around one call, GPU synchronised before it)")

    reference = make_case(PRESETS["llava15"], 1, dtype, device)  # the dense API, for comparison
    dense = dense_call(lightkv_ext.compress, reference)
    for _ in range(WARMUP_CALLS):
        dense()
    guarded(lambda: print(f"  dense compress, llava15 batch 1, host time per call: "
                          f"{summary(host_times_us(dense, device))}"))
    guarded(print_sync_points, dense, device)
    del reference, dense

    for preset in args.presets:
        profile_preset(preset, device, dtype, args)


if __name__ == "__main__":
    main()
