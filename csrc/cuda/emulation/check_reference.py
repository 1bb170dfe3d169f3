"""The CPU-emulated CUDA kernels through the public API against lightkv_ext.reference.

Run by run.sh: the shape matrix of python_tests/test_cuda.py at small sizes (uneven windows,
1x1 grid, GQA, masked text, second stage with sizes/positions, ties, explicit metrics, zero-weight
groups, varlen on each path that writes index and assignment, strided inputs), exact mode's two
ways of grouping, bitwise, and its screened sums against its float64 ones, bitwise. Exits non-zero
on any mismatch.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "python_tests"))
import emulated_ops  # noqa: E402
import lightkv_ext  # noqa: E402
from inputs import cancelling_keys  # noqa: E402
from lightkv_ext import reference  # noqa: E402
from random_cases import mismatches, same_bits, varlen_mismatches  # noqa: E402

emulated_ops.install()
failures = 0


def check(name, got, want, dtype):
    global failures
    found = mismatches(got, want, dtype)
    for line in found:
        print("     ", line)
    print(("FAIL" if found else "ok  "), name, flush=True)
    failures += bool(found)


def inputs(B, Hkv, Hq, N, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv, N, D, generator=g).to(dtype), torch.randn(B, Hkv, N, D, generator=g).to(dtype),
            torch.randn(B, Hq, T, D, generator=g).to(dtype))


cases = [  # B, Hkv, Hq, grid, T, D, windows, ratio
    (2, 2, 4, (6, 10), 7, 64, (2, 3), 0.5),
    (1, 1, 1, (1, 1), 1, 8, 1, 0.5),
    (2, 2, 8, (12, 12), 20, 40, 2, 0.5),
    (2, 4, 4, (5, 7), 3, 72, (5, 7), 0.5),
    (2, 1, 2, (9, 11), 5, 40, (2, 2), 0.3),
    (1, 2, 2, (16, 16), 9, 128, 1, 0.9),
    (2, 1, 17, (20, 26), 64, 32, 2, 0.5),  # 17 row tiles in 16 row ranges, 9 column ranges: row_finals_kernel
]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for i, (B, Hkv, Hq, grid, T, D, win, ratio) in enumerate(cases):
        N = grid[0] * grid[1]
        k, v, text = inputs(B, Hkv, Hq, N, T, D, dtype, i)
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(i)) < 0.7
        if B > 1:
            mask[0] = False
        kw = dict(ratio=ratio, windows=win, grid=grid, text_mask=mask)
        check(f"{dtype} case {i} {grid} win {win}", lightkv_ext.compress(k, v, text, **kw),
              reference.compress(k, v, text, **kw), dtype)
    # second stage with sizes and positions
    k, v, text = inputs(1, 2, 4, 12 * 18, 11, 32, dtype, 99)
    first = lightkv_ext.compress(k, v, text, ratio=0.5, windows=4, grid=(12, 18))
    kw = dict(ratio=0.5, windows=2, grid=(12, 18), sizes=first.sizes, positions=first.index)
    check(f"{dtype} second stage", lightkv_ext.compress(first.k, first.v, text, **kw),
          reference.compress(first.k, first.v, text, **kw), dtype)
# ties
k, v, text = inputs(2, 2, 2, 64, 3, 16, torch.float32, 7)
k[:, :, 8:16] = k[:, :, 0:1]
k[:, :, 40:48] = k[:, :, 32:40]
kw = dict(ratio=0.5, windows=(2, 2), grid=(8, 8))
check("ties", lightkv_ext.compress(k, v, text, **kw), reference.compress(k, v, text, **kw), torch.float32)
# explicit metrics: float64, and a 16-bit one of odd width with a stride (loaded one value at a time)
k, v, text = inputs(2, 2, 4, 64, 5, 32, torch.bfloat16, 8)
g = torch.Generator().manual_seed(8)
for name, metric in (("metric float64", torch.randn(2, 64, 40, dtype=torch.float64, generator=g)),
                     ("metric bf16 odd strided", torch.randn(2, 64, 42, generator=g).to(torch.bfloat16)[:, :, ::2])):
    kw = dict(ratio=0.5, windows=2, grid=(8, 8), metric=metric)
    check(name, lightkv_ext.compress(k, v, text, **kw), reference.compress(k, v, text, **kw), torch.bfloat16)
# zero-weight groups
k, v, text = inputs(2, 2, 2, 30, 4, 32, torch.float16, 6)
imp = torch.rand(2, 30); imp[0, :12] = 0
kw = dict(ratio=0.5, windows=(2, 2), grid=(5, 6), importance=imp)
check("zero weights", lightkv_ext.compress(k, v, text, **kw), reference.compress(k, v, text, **kw), torch.float16)
# varlen vs per image; the image-local index and assignment (the ops' local_bases) on each path
# that writes them: exact mode's row numbering, row_groups_kernel (exact mode with
# LIGHTKV_FUSED_GROUPS=0, and screened windows) and, past 4096 tokens, slots_kernel
for name, grids, heads, dim, windows, knob in (
        ("exact", [(6, 6), (4, 9), (2, 3), (10, 7)], 2, 32, 2, None),
        ("exact, row_groups_kernel", [(6, 6), (4, 9), (2, 3), (10, 7)], 2, 32, 2, "0"),
        ("screened, row_groups_kernel", [(24, 24), (20, 30)], 1, 8, 1, None),
        ("past 4096 tokens", [(46, 46), (46, 46)], 1, 8, 4, None)):
    counts = [h * w for h, w in grids]
    g = torch.Generator().manual_seed(12)
    kp = torch.randn(sum(counts), heads, dim, generator=g); vp = torch.randn(sum(counts), heads, dim, generator=g)
    cut = [0, 3, 3, 5, 9][:len(grids)] + [9]
    tp = torch.randn(9, 2 * heads, dim, generator=g)
    cu = [0]
    for n in counts: cu.append(cu[-1] + n)
    call = dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32), grids=grids, ratio=0.5, windows=windows)
    if knob:
        os.environ["LIGHTKV_FUSED_GROUPS"] = knob
    out = lightkv_ext.compress_varlen(kp, vp, tp, cu_seqlens_text=torch.tensor(cut, dtype=torch.int32), **call)
    os.environ.pop("LIGHTKV_FUSED_GROUPS", None)
    found = varlen_mismatches(out, (kp, vp, tp), list(zip(cut[:-1], cut[1:])), torch.float32, call)
    for line in found:
        print("     ", line)
    print("FAIL" if found else "ok  ", f"varlen, {name}")
    failures += bool(found)
# Exact mode's groups laid out per window in exact_select_kernel == sorted per row by
# row_groups_kernel (LIGHTKV_FUSED_GROUPS=0), bitwise: random and tied keys (all of a window's
# merged srcs in one group: 18 of a 36-token window, 162 of a 325-token one, over several words of
# merged_srcs), nothing merged, a zero-weight group (its members read back from `members`).
for name, B, grid, win, ratio, tied in (("36-token windows", 2, (24, 24), 4, 0.5, False),
                                        ("36-token windows, tied", 1, (24, 24), 4, 0.5, True),
                                        ("325-token windows, tied", 1, (26, 50), 2, 0.5, True),
                                        ("ratio 0", 1, (8, 8), 2, 0.0, False)):
    k, v, text = inputs(B, 1, 2, grid[0] * grid[1], 3, 16, torch.bfloat16, 13)
    if tied:
        k[:] = k[:, :, :1]
    importance = torch.rand(B, grid[0] * grid[1], generator=torch.Generator().manual_seed(13))
    importance[:, :40] = 0
    kw = dict(ratio=ratio, windows=win, grid=grid, importance=importance)
    laid_out = lightkv_ext.compress(k, v, text, **kw)
    os.environ["LIGHTKV_FUSED_GROUPS"] = "0"
    sorted_rows = lightkv_ext.compress(k, v, text, **kw)
    del os.environ["LIGHTKV_FUSED_GROUPS"]
    ok = not same_bits(laid_out, sorted_rows)
    print("ok  " if ok else "FAIL", f"groups by window == by row, bitwise: {name}"); failures += not ok
    check(f"groups by window: {name}", laid_out, reference.compress(k, v, text, **kw), torch.bfloat16)
# Exact mode's screened sums (16-bit tensor cores, float32 over 32 features) rechecked in float64
# == the float64 sums, bitwise, and the reference's decisions: both item shapes, random, tied and
# cancelling keys (a large first and last feature, the last one's sign flipped on the dsts: the
# float32 sums round the cancelled terms, so screened cosines are far off and near-tied; without
# the recheck's rank cluster, or with a tiny eps, these cases fail).
for dtype in (torch.bfloat16, torch.float16):
    for keys in ("random", "tied", "cancelling"):
        for group in ("1", "3"):
            k, v, text = inputs(4, 2, 4, 72, 4, 32, dtype, 31)
            if keys == "tied":
                k[:] = k[:, :, :1]
            if keys == "cancelling":
                k = cancelling_keys(k)
            kw = dict(ratio=0.3, windows=(3, 1), grid=(6, 12),
                      importance=torch.rand(4, 72, generator=torch.Generator().manual_seed(31)))
            os.environ["LIGHTKV_EXACT_GROUP"] = group
            results = {}
            for dots in ("float64", "screened", "recheck"):
                os.environ["LIGHTKV_EXACT_DOTS"] = dots
                results[dots] = lightkv_ext.compress(k, v, text, **kw)
            del os.environ["LIGHTKV_EXACT_GROUP"], os.environ["LIGHTKV_EXACT_DOTS"]
            name = f"screened sums == float64, {dtype}, {keys} keys, exact group {group}"
            ok = not any(same_bits(results[other], results["float64"]) for other in ("screened", "recheck"))
            print("ok  " if ok else "FAIL", f"{name}, bitwise"); failures += not ok
            check(name, results["screened"], reference.compress(k, v, text, **kw), dtype)
# strided (token-major) == contiguous, bitwise
ktm = torch.randn(2, 100, 4, 64).half(); vtm = torch.randn(2, 100, 4, 64).half(); tt = torch.randn(2, 4, 7, 64).half()
a = lightkv_ext.compress(ktm.transpose(1, 2), vtm.transpose(1, 2), tt, ratio=0.5, windows=2)
b = lightkv_ext.compress(ktm.transpose(1, 2).contiguous(), vtm.transpose(1, 2).contiguous(), tt, ratio=0.5, windows=2)
ok = not same_bits(a, b)
print("ok  " if ok else "FAIL", "strided == contiguous bitwise"); failures += not ok
print("failures:", failures)
sys.exit(1 if failures else 0)
