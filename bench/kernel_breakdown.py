"""Where the time of one compress stage goes: per kernel on CUDA, per op on CPU (torch.profiler).

    python bench/kernel_breakdown.py [--cases llava15:1 llava15:32 video16k:1] [--device cpu|cuda]
                                     [--dtype bfloat16] [--calls 5] [--merge-mode screened] [--json PATH]

Each case (a bench_kernels.py preset and a batch size) runs the extension's compress (dense or
varlen) `--calls` times under the profiler after one warm-up call. On CUDA every kernel of the
call is listed, the extension's and torch's (allocations, copies); kernel chaining stays off
(LIGHTKV_PDL=0, the default), since a chained kernel's span would include its wait for the one
before it, and so is compress's second stream (LIGHTKV_OVERLAP=0), since kernels that share the
GPU take longer each. The sum is then the one-stream time; bench_kernels.py times the overlap.
On CPU the rows are the extension's ops. Times are sums over the calls divided by their number;
share = a row's time / the case's total. `--merge-mode screened` passes the merge op a loose
max_window, so that CUDA runs its screened matching where it would run the exact one (an A/B of
the two modes on the same build). `--ncu-range` only runs one call per case inside the CUDA
profiler range, for Nsight Compute's hardware counters (gpu_check.sh's `ncu` step):

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        python bench/kernel_breakdown.py --ncu-range --cases llava15:32

`--timeline` (CUDA) shows instead when each kernel of a call runs: the compress (or
compress_varlen, with host offsets) captured in a CUDA graph as bench_kernels.py's
lightkv_ext_graph (the defaults: second stream on, chaining off), replayed `--calls` times under
the profiler; for the last replay, per kernel its stream, start and end (µs after the replay's
first kernel starts) and the idle time on its stream before it, then the span against the summed
kernel times (how much the two streams overlap).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

import lightkv_ext
from lightkv_ext import api
from lightkv_ext.windows import WindowLayout
from _timing import cli_device, format_number, markdown_table, run_metadata, write_json
from bench_kernels import PRESETS, dense_call, graph_call, make_case, varlen_call, with_environment

DEFAULT_CASES = ("llava15:1", "llava15:32", "qwen25vl:1", "video:1", "video16k:1")


def short_name(name: str) -> str:
    """The function name of a demangled kernel signature ('void ns::f<T>(Params)' -> 'f')."""
    match = re.search(r"(\w+)(?:<.*>)?\(", name)
    return match.group(1) if match else name


def loose_window_bound():
    """The API's window layouts with max_window = 2^40 while active (screened mode on CUDA)."""
    true_layout = api.full_grid_layout

    def loose_layout(*args, **kwargs):
        layout = true_layout(*args, **kwargs)  # cached: not modified
        return WindowLayout(layout.tokens, layout.offsets, layout.kept, 2**40)

    return mock.patch.object(api, "full_grid_layout", loose_layout)


def parse_case(text: str) -> Tuple[str, int]:
    name, _, batch = text.partition(":")
    if name not in PRESETS or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected PRESET:BATCH with PRESET in {sorted(PRESETS)}, got {text!r}")
    return name, int(batch)


def profile_rows(fn, device: torch.device, calls: int) -> List[dict]:
    """Per kernel (CUDA) or lightkv op (CPU): launches (calls) and microseconds per call, and share."""
    on_cuda = device.type == "cuda"
    fn()
    if on_cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    time_us, counts = collections.Counter(), collections.Counter()
    for event in profiler.events():
        if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not on_cuda and (not event.name.startswith("lightkv::") or event.name == "lightkv::compress"):
            continue  # on CPU lightkv::compress is the lightkv::score and lightkv::merge it calls
        name = short_name(event.name) if on_cuda else event.name
        time_us[name] += event.time_range.elapsed_us() / calls
        counts[name] += 1
    total = sum(time_us.values())
    return [{"name": name, "count_per_call": counts[name] / calls, "us_per_call": us,
             "share": us / total if total > 0 else 0.0} for name, us in time_us.most_common()]


GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")  # Chrome-trace categories of work on the GPU


def timeline_rows(trace_events: Sequence[dict], replays: int) -> List[dict]:
    """The last of `replays` equal runs in a Chrome trace's events: per GPU activity, in start
    order, its stream, start and end (µs after the run's first start) and the time its stream was
    idle before it (None for a stream's first)."""
    activities = sorted((e for e in trace_events if e.get("cat") in GPU_ACTIVITIES), key=lambda e: e["ts"])
    if not activities or len(activities) % replays != 0:
        raise ValueError(f"expected the same GPU activities in each of {replays} replays, "
                         f"got {len(activities)} in all")
    last = activities[len(activities) - len(activities) // replays:]
    first_start = last[0]["ts"]
    rows, stream_end = [], {}
    for event in last:
        stream = event.get("args", {}).get("stream", event.get("tid"))
        start = event["ts"] - first_start
        end = start + event["dur"]
        idle = start - stream_end[stream] if stream in stream_end else None
        stream_end[stream] = max(end, stream_end.get(stream, end))
        rows.append({"name": short_name(event["name"]), "stream": stream, "start_us": start, "end_us": end,
                     "idle_before_us": idle})
    return rows


def timeline(call, device: torch.device, replays: int) -> List[dict]:
    """timeline_rows of `call` captured in a CUDA graph and replayed `replays` times under the profiler."""
    replay = graph_call(call, device)
    replay()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(replays):
            replay()
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)["traceEvents"]
    return timeline_rows(events, replays)


def print_timeline(name: str, batch: int, rows: Sequence[dict]) -> None:
    span = max(row["end_us"] for row in rows)
    busy = sum(row["end_us"] - row["start_us"] for row in rows)
    print(f"### {name}, batch {batch}: {span:.1f} µs from the first kernel's start to the last one's end, "
          f"{busy:.1f} µs of kernels summed, {len({row['stream'] for row in rows})} streams\n")
    print(markdown_table(["kernel", "stream", "start µs", "end µs", "idle before on its stream µs"],
                         [[row["name"], row["stream"], format_number(row["start_us"]), format_number(row["end_us"]),
                           "-" if row["idle_before_us"] is None else format_number(row["idle_before_us"])]
                          for row in rows]))
    print()


def print_header(metadata: dict, run: str) -> None:
    print(f"- device: {metadata['device']}\n- torch {metadata['torch']}\n- command: `{metadata['command']}`\n"
          f"- {run}\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                        metavar="PRESET:BATCH")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per case (default 5)")
    parser.add_argument("--merge-mode", choices=("auto", "screened"), default="auto",
                        help="auto: the API's true max_window (default); screened: a loose one")
    parser.add_argument("--json", metavar="PATH", help="write the rows and run metadata as JSON")
    parser.add_argument("--ncu-range", action="store_true",
                        help="CUDA: instead of profiling, run each case's compress once (after a warm-up call) "
                             "between cudaProfilerStart and cudaProfilerStop, for `ncu --profile-from-start off`")
    parser.add_argument("--timeline", action="store_true",
                        help="CUDA: when each kernel of a CUDA-graph replay runs, per stream")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    return args


def case_call(name: str, batch: int, dtype: torch.dtype, device: torch.device):
    """The case's inputs and the extension's compress on them (dense or varlen), as a callable."""
    case = make_case(PRESETS[name], batch, dtype, device)
    return case, varlen_call(case) if case.preset.varlen else dense_call(lightkv_ext.compress, case)


def ncu_range(cases: Sequence[Tuple[str, int]], dtype: torch.dtype, device: torch.device) -> List[dict]:
    """One compress per case inside the CUDA profiler range (what ncu reads with --profile-from-start off)."""
    ran = []
    for name, batch in cases:
        case, call = case_call(name, batch, dtype, device)
        call()
        torch.cuda.synchronize(device)
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize(device)
        torch.cuda.profiler.stop()
        ran.append({"preset": name, "batch": batch, "vision_tokens": case.vision_tokens})
        print(f"ran {name}, batch {batch} ({case.vision_tokens} vision tokens) in the profiler range", flush=True)
        del case
    return ran


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = cli_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    metadata = run_metadata(device)
    if args.ncu_range:
        if device.type != "cuda":
            raise SystemExit("--ncu-range: needs a CUDA device")
        return dict(metadata, dtype=str(dtype).replace("torch.", ""), cases=ncu_range(args.cases, dtype, device))
    if args.timeline:
        if device.type != "cuda":
            raise SystemExit("--timeline: needs a CUDA device")
        print_header(metadata, f"{dtype}, the last of {args.calls} replays of a CUDA graph of the call")
        cases = []
        for name, batch in args.cases:
            case, call = case_call(name, batch, dtype, device)
            rows = timeline(call, device, args.calls)
            print_timeline(name, batch, rows)
            cases.append({"preset": name, "batch": batch, "vision_tokens": case.vision_tokens, "timeline": rows})
            del case
        result = dict(metadata, dtype=str(dtype).replace("torch.", ""), calls=args.calls, cases=cases)
        if args.json:
            write_json(args.json, result)
        return result
    print_header(metadata, f"{dtype}, {args.calls} profiled calls per case, kernel chaining and second stream off, "
                           f"merge mode {args.merge_mode}")
    cases = []
    for name, batch in args.cases:
        case, call = case_call(name, batch, dtype, device)
        with loose_window_bound() if args.merge_mode == "screened" else contextlib.nullcontext():
            rows = profile_rows(with_environment(call, LIGHTKV_PDL="0", LIGHTKV_OVERLAP="0"), device, args.calls)
        cases.append({"preset": name, "batch": batch, "vision_tokens": case.vision_tokens, "rows": rows})
        total = sum(row["us_per_call"] for row in rows)
        print(f"### {name}, batch {batch} ({case.vision_tokens} vision tokens): {total:.1f} µs per call\n")
        on_cuda = device.type == "cuda"
        print(markdown_table(["kernel" if on_cuda else "op", "launches" if on_cuda else "calls", "µs per call",
                              "share"],
                             [[row["name"], format_number(row["count_per_call"], 1),
                               format_number(row["us_per_call"]), f"{100 * row['share']:.1f}%"] for row in rows]))
        print()
        del case
        print(f"done: {name} batch {batch}", file=sys.stderr, flush=True)
    result = dict(metadata, dtype=str(dtype).replace("torch.", ""), calls=args.calls, merge_mode=args.merge_mode,
                  cases=cases)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
