"""Kernel benchmark of one LightKV compress stage: eager reference, compiled reference, extension.

    python bench/bench_kernels.py [--quick] [--json PATH] [--plot PATH] [--device cpu|cuda]

Every call is one compress stage at ratio 0.5 (scoring + windowed bipartite merge) on random
keys, values and text queries shaped like real LVLM prefill caches. Times are medians and
p20/p80 over many runs: wall time on CPU, CUDA events with L2 flushed between runs on CUDA.
Achieved bandwidth counts the bytes the op must move: K and V read, compressed K and V written,
text queries read. On CUDA `copy_roofline` is a device copy of the K/V bytes (read K and V,
write the compressed K and V), the floor any implementation of the op pays, and
`lightkv_ext_graph` replays the same call captured in a CUDA graph: its GPU time without the
Python and launch overhead that `lightkv_ext` (an eager call) includes. The packed presets call
`compress_varlen` with host offsets (lists), its sync-free form: CUDA tensors as `cu_seqlens`
cost a host sync each, and a call that syncs cannot be captured (such a backend is reported as
skipped, with the reason);
`lightkv_ext_chained` and `lightkv_ext_graph_chained` are the eager call and the graph with
kernel chaining (programmatic dependent launch, opt-in) turned on (LIGHTKV_PDL=1), which shows
what chaining saves or costs, `lightkv_ext_graph_one_stream` the graph with the merge decisions
on the current stream instead of overlapping the scoring on a second one (LIGHTKV_OVERLAP=0),
which shows what the overlap saves, `lightkv_ext_graph_one_pass` and `lightkv_ext_graph_two_passes` with the scoring
forced to the one-pass kernel (thread block clusters) where it applies (LIGHTKV_SCORE_PASSES=1) or
to the two passes (=2; by default the shape picks), and `lightkv_ext_graph_unfused_groups` with
exact mode's rows grouped by their own kernel (a block radix sort per row) after the selection
instead of window by window inside it (LIGHTKV_FUSED_GROUPS=0), and `lightkv_ext_graph_float64_dots`
with exact mode's dot products all on the float64 tensor cores (LIGHTKV_EXACT_DOTS=float64), where
by default many windows (LLaVA-1.5 at batch 32) take 16-bit tensor-core sums rechecked in float64.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import lightkv_ext
from lightkv_ext import reference

from _timing import (cli_device, format_number, load_pyplot, markdown_table, run_metadata, save_figure, time_on,
                     write_json)

RATIO = 0.5
SEED = 0


@dataclasses.dataclass(frozen=True)
class Preset:
    """Cache shape of one prompt; `batch` prompts are compressed in one call."""

    name: str
    model: str
    grids: Tuple[Tuple[int, int], ...]  # one (h, w) per image of the prompt
    kv_heads: int
    query_heads: int
    head_dim: int
    text_tokens: int  # per image
    windows: int
    varlen: bool  # packed compress_varlen over all images of all prompts
    full_batches: Tuple[int, ...]  # batch sizes of a full run

    @property
    def tokens_per_prompt(self) -> int:
        return sum(h * w for h, w in self.grids)


PRESETS = {
    "llava15": Preset("llava15", "LLaVA-1.5-7B, 336px", ((24, 24),), 32, 32, 128, 64, 4, False, (1, 32)),
    "llava_next": Preset("llava_next", "LLaVA-NeXT-7B anyres, 5 tiles", ((24, 24),) * 5, 32, 32, 128, 64, 2,
                         True, (1, 32)),
    "qwen25vl": Preset("qwen25vl", "Qwen2.5-VL-7B, 728x1400px", ((26, 50),), 4, 28, 128, 64, 2, False, (1, 32)),
    "video": Preset("video", "Qwen2.5-VL-7B heads, 16 frames", ((14, 14),) * 16, 4, 28, 128, 64, 2, True, (1, 32)),
    "video16k": Preset("video16k", "Qwen2.5-VL-7B heads, one 16k-token image", ((128, 128),), 4, 28, 128, 64, 4,
                       False, (1,)),
    # Smoke-test presets (python_tests/test_bench.py): tiny shapes, dense and varlen paths.
    "tiny": Preset("tiny", "smoke test", ((8, 8),), 2, 4, 32, 8, 2, False, (1, 2)),
    "tiny_varlen": Preset("tiny_varlen", "smoke test", ((8, 8), (6, 10)), 2, 4, 32, 8, 2, True, (1, 2)),
}
DEFAULT_PRESETS = ("llava15", "llava_next", "qwen25vl", "video")
# Batch sizes of a full CPU run: batch 32 only where one eager reference call stays near a second
# on a small CPU (the packed presets at batch 32 are 160 and 512 images).
CPU_FULL_BATCHES = {"llava15": (1, 32), "llava_next": (1,), "qwen25vl": (1, 32), "video": (1,)}


@dataclasses.dataclass
class Case:
    """Inputs of one benchmark call. Dense: (B, H, N, D) tensors. Varlen: packed (total, H, D)."""

    preset: Preset
    batch: int
    k: torch.Tensor
    v: torch.Tensor
    text: torch.Tensor
    cu_seqlens: Optional[List[int]] = None  # host offsets: the sync-free form of compress_varlen
    cu_seqlens_text: Optional[List[int]] = None
    grids: Optional[List[Tuple[int, int]]] = None

    @property
    def vision_tokens(self) -> int:
        return self.batch * self.preset.tokens_per_prompt


def make_case(preset: Preset, batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    generator = torch.Generator().manual_seed(SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    p = preset
    if not p.varlen:
        (h, w), = p.grids
        return Case(p, batch, randn(batch, p.kv_heads, h * w, p.head_dim), randn(batch, p.kv_heads, h * w, p.head_dim),
                    randn(batch, p.query_heads, p.text_tokens, p.head_dim))
    grids = list(p.grids) * batch
    cu_seqlens = [0]
    for h, w in grids:
        cu_seqlens.append(cu_seqlens[-1] + h * w)
    cu_seqlens_text = [image * p.text_tokens for image in range(len(grids) + 1)]
    total = cu_seqlens[-1]
    return Case(p, batch, randn(total, p.kv_heads, p.head_dim), randn(total, p.kv_heads, p.head_dim),
                randn(len(grids) * p.text_tokens, p.query_heads, p.head_dim), cu_seqlens, cu_seqlens_text, grids)


def dense_call(compress: Callable, case: Case) -> Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A call of a dense compress (the reference or the extension) returning (k, v, sizes)."""
    (grid,) = case.preset.grids

    def call():
        out = compress(case.k, case.v, case.text, ratio=RATIO, windows=case.preset.windows, grid=grid)
        return out.k, out.v, out.sizes

    return call


def per_image_call(compress: Callable, case: Case) -> Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The packed case as a Python loop of dense calls, one per image; outputs packed token-major."""
    vision_offsets, text_offsets = case.cu_seqlens, case.cu_seqlens_text

    def image(packed, offsets, index):  # (total, H, D) -> (1, H, n, D) view
        return packed[offsets[index]:offsets[index + 1]].permute(1, 0, 2).unsqueeze(0)

    def call():
        ks, vs, sizes = [], [], []
        for index, grid in enumerate(case.grids):
            out = compress(image(case.k, vision_offsets, index), image(case.v, vision_offsets, index),
                           image(case.text, text_offsets, index), ratio=RATIO, windows=case.preset.windows,
                           grid=grid)
            ks.append(out.k[0].transpose(0, 1))
            vs.append(out.v[0].transpose(0, 1))
            sizes.append(out.sizes[0])
        return torch.cat(ks), torch.cat(vs), torch.cat(sizes)

    return call


def varlen_call(case: Case) -> Callable[[], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    def call():
        out = lightkv_ext.compress_varlen(case.k, case.v, case.text, case.cu_seqlens, case.grids,
                                          cu_seqlens_text=case.cu_seqlens_text, ratio=RATIO,
                                          windows=case.preset.windows)
        return out.k, out.v, out.sizes

    return call


def backend_call(compress: Callable, case: Case) -> Callable:
    return per_image_call(compress, case) if case.preset.varlen else dense_call(compress, case)


def moved_bytes(case: Case, kept_tokens: int) -> Tuple[int, int]:
    """(K/V bytes the op must move, text bytes it reads): K, V read + compressed K, V written."""
    p = case.preset
    element = case.k.element_size()
    kv_bytes = 2 * (case.vision_tokens + kept_tokens) * p.kv_heads * p.head_dim * element
    return kv_bytes, case.text.numel() * element


def matches(expected, actual, dtype: torch.dtype) -> bool:
    """Same sizes (hence the same merge decisions) and K/V within the dtype's tolerance."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    k_ref, v_ref, sizes_ref = expected
    k_out, v_out, sizes_out = actual
    return (k_ref.shape == k_out.shape and torch.equal(sizes_ref.cpu().long(), sizes_out.cpu().long())
            and torch.allclose(k_ref.float(), k_out.float(), rtol=tolerance, atol=tolerance)
            and torch.allclose(v_ref.float(), v_out.float(), rtol=tolerance, atol=tolerance))


def benchmark_case(case: Case, device: torch.device, dtype: torch.dtype, quick: bool) -> List[dict]:
    p = case.preset
    base = {"preset": p.name, "model": p.model, "batch": case.batch, "images": len(p.grids) * case.batch,
            "grid": "x".join(map(str, p.grids[0])), "vision_tokens": case.vision_tokens,
            "heads_q": p.query_heads, "heads_kv": p.kv_heads, "head_dim": p.head_dim,
            "text_tokens": p.text_tokens, "windows": p.windows, "ratio": RATIO,
            "dtype": str(dtype).replace("torch.", ""), "api": "compress_varlen" if p.varlen else "compress"}

    reference_fn = backend_call(reference.compress, case)
    expected = reference_fn()
    kept = expected[0].shape[0] if p.varlen else case.batch * expected[0].shape[2]
    kv_bytes, text_bytes = moved_bytes(case, kept)
    base["kept_tokens"] = kept

    candidates: List[Tuple[str, Optional[Callable], str]] = [("reference", reference_fn, "")]
    if quick:
        candidates.append(("reference_compiled", None, "skipped in --quick (compilation takes minutes)"))
    else:
        candidates.append(compiled_reference(case))
    extension_fn = varlen_call(case) if p.varlen else dense_call(lightkv_ext.compress, case)
    candidates.append(("lightkv_ext", extension_fn, ""))
    if device.type == "cuda":
        candidates += [("lightkv_ext_chained", chained(extension_fn), ""),
                       ("lightkv_ext_graph", graph_call(extension_fn, device), ""),
                       ("lightkv_ext_graph_chained", graph_call(chained(extension_fn), device), ""),
                       ("lightkv_ext_graph_one_stream", graph_call(one_stream(extension_fn), device), ""),
                       ("lightkv_ext_graph_one_pass", graph_call(score_passes(extension_fn, 1), device), ""),
                       ("lightkv_ext_graph_two_passes", graph_call(score_passes(extension_fn, 2), device), ""),
                       ("lightkv_ext_graph_unfused_groups", graph_call(unfused_groups(extension_fn), device), ""),
                       ("lightkv_ext_graph_float64_dots", graph_call(float64_dots(extension_fn), device), "")]
        candidates.append(("copy_roofline", copy_roofline_call(kv_bytes, device), ""))

    rows = []
    for backend, fn, reason in candidates:
        row = dict(base, backend=backend)
        if fn is None:
            rows.append(dict(row, status="skipped", reason=reason))
            continue
        try:
            checked = backend.startswith("lightkv_ext") or backend == "reference_compiled"
            row["matches_reference"] = matches(expected, fn(), dtype) if checked else None
            timing = time_on(device, fn, quick=quick)
        except Exception as error:  # a backend that fails is reported, the others still run
            rows.append(dict(row, status="skipped", reason=f"{type(error).__name__}: {first_line(error)}"))
            continue
        op_bytes = kv_bytes if backend == "copy_roofline" else kv_bytes + text_bytes
        rows.append(dict(row, status="ok", median_us=timing.median_us, p20_us=timing.p20_us,
                         p80_us=timing.p80_us, repetitions=timing.repetitions, host_us=timing.host_us,
                         bytes=op_bytes, gbps=op_bytes / (timing.median_us * 1e-6) / 1e9))
    add_relative_columns(rows)
    return rows


def compiled_reference(case: Case) -> Tuple[str, Optional[Callable], str]:
    """torch.compile of the reference, fresh per case so that recompile limits never kick in."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(reference.compress)
    except Exception as error:
        return "reference_compiled", None, f"{type(error).__name__}: {first_line(error)}"
    return "reference_compiled", backend_call(compiled, case), ""


def graph_call(fn: Callable, device: torch.device) -> Callable:
    """fn captured in a CUDA graph at the first call (after warm-up calls on a side stream, so a
    capture failure is reported like any backend failure); each call replays the graph and returns
    the captured outputs, which the replay overwrites. A call that still synchronizes with the
    host after its warm-up raises before the capture starts (a failed capture could leave the
    capturing stream current)."""
    captured = {}

    def capture():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # builds what the call caches (window layouts, tables), which may sync
            assert_no_host_sync(fn)
        torch.cuda.current_stream(device).wait_stream(side)
        captured["graph"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured["graph"]):
            captured["outputs"] = fn()

    def replay():
        if not captured:
            capture()
        captured["graph"].replay()
        return captured["outputs"]

    return replay


def assert_no_host_sync(fn: Callable) -> None:
    """Calls fn once with torch's sync debug mode raising on any host synchronization."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # torch warns that the mode is a prototype
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as error:
        if "synchronizing CUDA operation" not in str(error):  # torch's message in this mode
            raise
        raise RuntimeError("the call synchronizes with the host, so it cannot be captured") from error
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def with_environment(fn: Callable, **variables: str) -> Callable:
    """fn with environment variables set while it runs (the extension reads its knobs at every call,
    so a graph captured this way keeps them)."""

    def call():
        previous = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return fn()
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return call


def chained(fn: Callable) -> Callable:
    """fn with the extension's kernel chaining turned on (LIGHTKV_PDL=1)."""
    return with_environment(fn, LIGHTKV_PDL="1")


def one_stream(fn: Callable) -> Callable:
    """fn with compress's second stream turned off (LIGHTKV_OVERLAP=0)."""
    return with_environment(fn, LIGHTKV_OVERLAP="0")


def score_passes(fn: Callable, passes: int) -> Callable:
    """fn with the scoring forced to the one-pass kernel where it applies (passes=1) or to the two
    passes (passes=2): LIGHTKV_SCORE_PASSES."""
    return with_environment(fn, LIGHTKV_SCORE_PASSES=str(passes))


def unfused_groups(fn: Callable) -> Callable:
    """fn with exact mode's rows grouped by row_groups_kernel (LIGHTKV_FUSED_GROUPS=0)."""
    return with_environment(fn, LIGHTKV_FUSED_GROUPS="0")


def float64_dots(fn: Callable) -> Callable:
    """fn with exact mode's dot products on the float64 tensor cores wherever it runs
    (LIGHTKV_EXACT_DOTS=float64), where block groups screen them on the 16-bit ones by default."""
    return with_environment(fn, LIGHTKV_EXACT_DOTS="float64")


def copy_roofline_call(kv_bytes: int, device: torch.device) -> Callable:
    """A flat device copy that reads and writes kv_bytes / 2 each: the op's K/V traffic."""
    source = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    return lambda: destination.copy_(source)


def add_relative_columns(rows: List[dict]) -> None:
    timed = {row["backend"]: row["median_us"] for row in rows if row["status"] == "ok"}
    for row in rows:
        if row["status"] != "ok":
            row.update(speedup_vs_reference=None, roofline_fraction=None)
            continue
        row["speedup_vs_reference"] = timed["reference"] / row["median_us"] if "reference" in timed else None
        # Fraction of the copy roofline reached: copy time / this backend's time (1.0 = at roofline).
        row["roofline_fraction"] = timed["copy_roofline"] / row["median_us"] if "copy_roofline" in timed else None


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def render_table(rows: Sequence[dict]) -> str:
    headers = ["preset", "batch", "images", "tokens", "kept", "heads q/kv", "windows", "dtype", "backend",
               "median µs", "p20 µs", "p80 µs", "host µs", "speedup", "GB/s", "of roofline", "matches ref", "note"]
    body = []
    for row in rows:
        ok = row["status"] == "ok"
        match = {True: "yes", False: "NO", None: ""}[row.get("matches_reference")]
        body.append([
            row["preset"], row["batch"], row["images"], row["vision_tokens"], row.get("kept_tokens", "-"),
            f"{row['heads_q']}/{row['heads_kv']}", f"{row['windows']}x{row['windows']}", row["dtype"],
            row["backend"],
            format_number(row.get("median_us")), format_number(row.get("p20_us")),
            format_number(row.get("p80_us")), format_number(row.get("host_us")),
            format_number(row.get("speedup_vs_reference"), 2) + ("x" if ok else ""),
            format_number(row.get("gbps"), 2),
            format_number(row.get("roofline_fraction"), 2), match,
            "" if ok else f"skipped: {row['reason']}",
        ])
    return markdown_table(headers, body)


def plot(rows: Sequence[dict], path: str, device_name: str) -> bool:
    pyplot = load_pyplot()
    if pyplot is None:
        return False
    figure, axes = pyplot.subplots(figsize=(8, 5.5))
    # Colour = backend, marker = preset; a line joins one preset's batch sizes (its scaling).
    backends = list(dict.fromkeys(row["backend"] for row in rows if row["status"] == "ok"))
    presets = list(dict.fromkeys(row["preset"] for row in rows))
    colors = {backend: f"C{i}" for i, backend in enumerate(backends)}
    markers = {preset: "osD^vP*X"[i % 8] for i, preset in enumerate(presets)}
    for backend in backends:
        for preset in presets:
            points = sorted((row["vision_tokens"], row["median_us"]) for row in rows
                            if (row["backend"], row["preset"]) == (backend, preset) and row["status"] == "ok")
            if points:
                axes.plot(*zip(*points), color=colors[backend], marker=markers[preset], linewidth=1)
    handles = [pyplot.Line2D([], [], color=colors[b], linewidth=2, label=b) for b in backends]
    handles += [pyplot.Line2D([], [], color="gray", marker=markers[p], linestyle="", label=p) for p in presets]
    axes.legend(handles=handles, fontsize=8)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("vision tokens per call (batch x tokens per prompt)")
    axes.set_ylabel("median time per compress stage (µs)")
    axes.set_title(f"LightKV compress stage (ratio {RATIO}) on {device_name}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    return save_figure(pyplot, figure, path)


def replot(json_paths: Sequence[str], plot_path: Optional[str]) -> dict:
    """The plot of earlier runs' rows (all of one device), e.g. of results fetched from a GPU machine."""
    if not plot_path:
        raise SystemExit("--replot needs --plot PATH")
    runs = []
    for path in json_paths:
        with open(path) as f:
            runs.append(json.load(f))
    devices = sorted({run["device"] for run in runs})
    if len(devices) != 1:
        raise SystemExit(f"--replot: the files come from different devices: {devices}")
    rows = [row for run in runs for row in run["rows"]]
    plot(rows, plot_path, devices[0])
    return dict(runs[0], rows=rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 only, short repetition budgets, no torch.compile (under a minute)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the rows and run metadata as JSON (after each case, with complete=false "
                             "until the run ends)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time vs tokens per backend")
    parser.add_argument("--replot", nargs="+", metavar="JSON",
                        help="measure nothing: plot the rows of these --json files to --plot")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=list(DEFAULT_PRESETS))
    parser.add_argument("--batches", nargs="+", type=int,
                        help="batch sizes (prompts per call); default: 1 and 32 where they fit")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on cuda, float32 on cpu")
    return parser.parse_args(argv)


def batches_for(preset: Preset, args: argparse.Namespace, device: torch.device) -> Tuple[int, ...]:
    if args.batches:
        return tuple(args.batches)
    if args.quick:
        return (1,)
    if device.type == "cpu":
        return CPU_FULL_BATCHES.get(preset.name, preset.full_batches)
    return preset.full_batches


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.plot)
    device = cli_device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    metadata = run_metadata(device)

    mode = "quick" if args.quick else "full"
    rows: List[dict] = []
    for name in args.presets:
        preset = PRESETS[name]
        for batch in batches_for(preset, args, device):
            case = make_case(preset, batch, dtype, device)
            rows += benchmark_case(case, device, dtype, args.quick)
            del case
            print(f"done: {name} batch {batch}", file=sys.stderr, flush=True)
            if args.json:  # the rows so far, in case the run is cut short (a device call's time limit)
                write_json(args.json, dict(metadata, mode=mode, complete=False, rows=rows))

    metadata["load_average_1min_end"] = os.getloadavg()[0]
    print(f"- device: {metadata['device']}\n- torch {metadata['torch']}, python {metadata['python']}\n"
          f"- date: {metadata['date']} (1-minute load average at start / end: "
          f"{metadata['load_average_1min']:.2f} / {metadata['load_average_1min_end']:.2f})\n"
          f"- command: `{metadata['command']}`\n"
          f"- one compress stage per call, ratio {RATIO}, {dtype}; speedup = reference median / backend "
          "median; GB/s = (K, V read + compressed K, V written + text read) / median; on CUDA the "
          "medians are GPU time (the GPU is held busy while the host issues the call), host µs is "
          "the host time to issue one call\n")
    print(render_table(rows))
    result = dict(metadata, mode=mode, complete=True, rows=rows)
    if args.json:
        write_json(args.json, result)
    if args.plot and plot(rows, args.plot, metadata["device"]):
        print(f"\nplot written to {args.plot}")
    return result


if __name__ == "__main__":
    main()
