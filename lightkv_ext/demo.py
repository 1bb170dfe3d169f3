"""Demo: compress a LLaVA-1.5-shaped KV cache with LightKV's 3-stage schedule.

    python -m lightkv_ext.demo [--device cpu|cuda] [--dtype float16|bfloat16|float32] [--batch B]

One decoder layer's cache: 576 vision tokens on a 24x24 grid, 32 KV heads x 128 dims, a 64-token
prompt. The synthetic image has spatial structure (smooth features plus noise) and the prompt asks
about one region. Each stage prints the vision tokens and KV bytes left, the time per call, and how
far the attention output of held-out text queries moved (relative L2 error against the full cache,
with proportional attention: log(size) added to the logits of merged tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lightkv_ext

GRID = (24, 24)
HEADS, HEAD_DIM, TEXT, HELD_OUT = 32, 128, 64, 16
SCHEDULE = ((4, 0.5), (2, 0.5), (1, 0.5))  # (windows, ratio) per stage, as the paper's layers 12/18/24


def synthetic_layer(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Keys/values with 2-D structure, and text queries that look at the top-left region."""
    gen = torch.Generator().manual_seed(seed)
    h, w = GRID

    def field():
        coarse = torch.randn(batch * HEADS, HEAD_DIM, h // 4, w // 4, generator=gen)
        smooth = F.interpolate(coarse, size=GRID, mode="bilinear", align_corners=False)
        fine = 0.3 * torch.randn(batch * HEADS, HEAD_DIM, h, w, generator=gen)
        return (smooth + fine).reshape(batch, HEADS, HEAD_DIM, h * w).transpose(2, 3)

    k, v = field(), field()
    region = k.reshape(batch, HEADS, h, w, HEAD_DIM)[:, :, : h // 3, : w // 3].mean(dim=(2, 3))
    queries = region[:, :, None, :] + 0.5 * torch.randn(batch, HEADS, TEXT + HELD_OUT, HEAD_DIM, generator=gen)
    queries = queries * 2.0
    to = dict(device=device, dtype=dtype)
    return k.to(**to), v.to(**to), queries[:, :, :TEXT].to(**to), queries[:, :, TEXT:].to(**to)


def attention(q, k, v, sizes=None):
    """Attention output of queries q over the cache (k, v), with log(size) bias for merged tokens."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if sizes is not None:
        logits = logits + sizes.float().log()[:, None, None, :]
    return logits.softmax(dim=-1) @ v.float()


def time_call(fn, device: torch.device, repeats: int = 20) -> float:
    """Median wall time of fn() in microseconds (synchronising on CUDA)."""
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))

    k, v, text, held_out = synthetic_layer(args.batch, device, dtype)
    full = attention(held_out, k, v)
    n_vision = k.shape[2]
    print(f"LightKV demo on {device} ({dtype}): batch {args.batch}, {n_vision} vision tokens on a "
          f"{GRID[0]}x{GRID[1]} grid, {HEADS} heads x {HEAD_DIM} dims, {TEXT} text tokens")
    print(f"{'stage':<22}{'tokens':>8}{'kept':>8}{'KV bytes':>12}{'us/call':>10}{'attn err':>10}")
    kv_bytes = 2 * k.numel() * k.element_size()
    print(f"{'full cache':<22}{n_vision:>8}{'100%':>8}{kv_bytes:>12,}{'':>10}{0.0:>10.4f}")

    sizes = positions = None
    for stage, (windows, ratio) in enumerate(SCHEDULE, start=1):
        def call(k=k, v=v, sizes=sizes, positions=positions):
            return lightkv_ext.compress(k, v, text, ratio=ratio, windows=windows, grid=GRID,
                                        sizes=sizes, positions=positions)

        out = call()
        micros = time_call(call, device)
        positions = out.index if positions is None else positions.gather(1, out.index)
        k, v, sizes = out.k, out.v, out.sizes
        error = (attention(held_out, k, v, sizes) - full).norm() / full.norm()
        kv_bytes = 2 * k.numel() * k.element_size()
        label = f"{stage}: {windows}x{windows} windows, -{ratio:.0%}"
        print(f"{label:<22}{k.shape[2]:>8}{k.shape[2] / n_vision:>8.1%}{kv_bytes:>12,}{micros:>10.0f}{error:>10.4f}")
    assert int(sizes.sum(dim=1)[0]) == n_vision


if __name__ == "__main__":
    main()
