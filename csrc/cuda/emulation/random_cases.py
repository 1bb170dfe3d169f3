"""Random cases through the public API over the CPU-emulated CUDA kernels, against lightkv_ext.reference.

    LIGHTKV_EMULATED_LIB=lib.so python random_cases.py [--seed S] [--cases N] [--seconds T] [--case SEED]

check_reference.py runs a fixed shape matrix; this draws shapes the matrix does not name: any dtype,
batch, GQA group and head dim up to 256, grids from 1x1 to 72x72 (past the one pass's 2048-token
rows and the selection's 4096-token grouping), uneven windows, masked and empty prompts, a second
stage (sizes, positions), exactly tied keys, token-major strides, explicit importance / metric /
sizes / scale, varlen packs of up to 12 images with disjoint, shared or empty text spans (a second
stage too), and the kernels' A/B knobs (LIGHTKV_SCORE_PASSES=1|2, LIGHTKV_EXACT_GROUP,
LIGHTKV_EXACT_MMA=8, LIGHTKV_FUSED_GROUPS=0, LIGHTKV_EXACT_DOTS=float64|screened|recheck). Each case checks that index, assignment and sizes
equal the reference's, importance and values are within tolerance, ratio 0 returns k and v
bitwise, a second call gives the same bits and the inputs are unchanged. Every case has its own
seed: a failure prints it, and --case SEED reruns that case alone. Exits non-zero on any failure.

Under the sanitizers, with a library built by `build.py DIR library --sanitize ...` and preloaded:
  address,undefined: LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
                     ASAN_OPTIONS=detect_leaks=0 (about 5x slower)
  thread:            LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" OMP_NUM_THREADS=1 (torch's OpenMP
                     threads are not instrumented; about 15x slower)
"""
import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulated_ops  # noqa: E402
import lightkv_ext  # noqa: E402
from lightkv_ext import reference  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
KNOBS = ("LIGHTKV_SCORE_PASSES", "LIGHTKV_EXACT_GROUP", "LIGHTKV_EXACT_MMA", "LIGHTKV_FUSED_GROUPS",
         "LIGHTKV_EXACT_DOTS")


def mismatches(got, want, dtype, layout=lambda x: x):
    """What differs between a result and the reference's (`layout` maps the reference's k, v onto got's)."""
    found = [f"{name} differs" for name in ("index", "assignment", "sizes")
             if not torch.equal(getattr(got, name), getattr(want, name))]
    for name, tol, atol, convert in (("importance", 1e-4, 1e-6, lambda x: x), ("k", TOL[dtype], TOL[dtype], layout),
                                     ("v", TOL[dtype], TOL[dtype], layout)):
        try:
            torch.testing.assert_close(getattr(got, name), convert(getattr(want, name)), rtol=tol, atol=atol)
        except AssertionError as error:
            found.append(f"{name}: " + " ".join(str(error).split("\n")[:3]))
    return found


def bits(t):
    return t.contiguous().view(torch.uint8)


def same_bits(a, b):
    """The fields of two results whose bits differ."""
    return [f"{name} not deterministic" for name in a._fields if not torch.equal(bits(getattr(a, name)),
                                                                                  bits(getattr(b, name)))]


def set_knobs(rng):
    for knob in KNOBS:
        os.environ.pop(knob, None)
    passes = rng.choice([None, "1", "2"])  # by shape, or forced
    if passes:
        os.environ["LIGHTKV_SCORE_PASSES"] = passes
    if rng.random() < 0.3:
        os.environ["LIGHTKV_EXACT_GROUP"] = rng.choice(["1", "3"])
    if rng.random() < 0.3:
        os.environ["LIGHTKV_EXACT_MMA"] = "8"
    if rng.random() < 0.2:
        os.environ["LIGHTKV_FUSED_GROUPS"] = "0"
    if rng.random() < 0.5:
        os.environ["LIGHTKV_EXACT_DOTS"] = rng.choice(["float64", "screened", "recheck"])
    return {knob: os.environ[knob] for knob in KNOBS if knob in os.environ}


def dense_case(rng, g):
    """compress on (B, H, N, D) inputs: shapes, masks, a second stage, ties, token-major strides."""
    dtype = rng.choice(DTYPES)
    B, H_kv = rng.choice([1, 1, 2, 3]), rng.choice([1, 2, 4])
    H_q = H_kv * rng.choice([1, 1, 2, 3, 4])
    h, w = rng.randint(1, rng.choice([4, 12, 30])), rng.randint(1, rng.choice([4, 12, 30]))
    long_rows = rng.random() < 0.08
    if long_rows:
        h, w = rng.randint(40, 72), rng.randint(40, 72)
        B, H_kv, H_q = 1, 1, rng.choice([1, 2])
    D = rng.choice([8, 16, 64] if long_rows else [8, 16, 24, 40, 64, 72, 128, 128, 136, 160, 256])
    T = rng.choice([1, 3, 7, 64, 65, 130])
    windows = (1, 1) if rng.random() < 0.3 else (rng.randint(1, h), rng.randint(1, w))
    ratio = rng.choice([0.0, 0.1, 0.3, 0.5, 0.5, 0.7, 0.99])
    second_stage = rng.random() < 0.2
    if second_stage:  # of one row: rows whose survivors fill the windows differently keep different M
        B = 1
    # Exact copies of one key tie exactly in every backend. Not in a second stage, whose averaged
    # copies differ in their last bits (ties that only rounding breaks; README), nor in long rows
    # (most srcs would take the slow full scan of the emulated screen).
    ties = not second_stage and not long_rows and rng.random() < 0.15
    token_major = rng.random() < 0.2
    N = h * w
    if token_major:
        k, v = (torch.randn(B, N, H_kv, D, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        k, v = (torch.randn(B, H_kv, N, D, generator=g).to(dtype) for _ in range(2))
    if ties and N >= 4:
        k[:, :, 1::3] = k[:, :, 0:1]
    text = torch.randn(B, H_q, T, D, generator=g).to(dtype)
    kwargs = dict(ratio=ratio, windows=windows, grid=(h, w))
    if rng.random() < 0.5:
        mask = torch.rand(B, T, generator=g) < 0.6
        if B > 1:  # a row whose prompt is all masked (uniform importance), or all real
            mask[0] = rng.random() < 0.5
        kwargs["text_mask"] = mask
    if second_stage:
        first = reference.compress(k, v, text, ratio=0.5, windows=windows, grid=(h, w))
        k, v = first.k, first.v
        kwargs.update(sizes=first.sizes, positions=first.index,
                      windows=(max(1, windows[0] // 2), max(1, windows[1] // 2)))
    described = dict(dtype=str(dtype), B=B, H_kv=H_kv, H_q=H_q, grid=(h, w), T=T, D=D, windows=kwargs["windows"],
                     ratio=ratio, masked="text_mask" in kwargs, second_stage=second_stage, ties=ties,
                     token_major=token_major)
    return described, dtype, (k, v, text), kwargs


def explicit_case(rng, g):
    """compress with the caller's importance (zeros included), metric, sizes or scale."""
    dtype = rng.choice(DTYPES)
    B, H_kv, D = rng.choice([1, 2]), rng.choice([1, 2]), rng.choice([16, 64])
    h, w = rng.randint(1, 20), rng.randint(1, 20)
    N = h * w
    k, v = (torch.randn(B, H_kv, N, D, generator=g).to(dtype) for _ in range(2))
    text = torch.randn(B, H_kv, 5, D, generator=g).to(dtype)
    kwargs = dict(ratio=rng.choice([0.3, 0.5]), windows=(rng.randint(1, h), rng.randint(1, w)), grid=(h, w))
    which = rng.choice(["importance", "metric", "sizes", "scale"])
    if which == "importance":
        importance = torch.rand(B, N, generator=g)
        kwargs["importance"] = importance.masked_fill(importance < 0.3, 0)  # zero-weight groups
    elif which == "metric":
        metric = torch.randn(B, N, rng.choice([3, 17, 64]), generator=g)
        kwargs["metric"] = metric.to(rng.choice([torch.float64, torch.float32, torch.bfloat16]))
    elif which == "sizes":
        kwargs["sizes"] = torch.randint(1, 5, (B, N), generator=g, dtype=torch.int32)
    else:
        # Up to 4x the usual 1/sqrt(D): far steeper softmaxes make float32 logits the limit of the
        # tiny weights' precision, and so of the values' (in every backend).
        kwargs["scale"] = rng.choice([0.01, 0.25, 0.5])
    described = dict(dtype=str(dtype), B=B, H_kv=H_kv, D=D, grid=(h, w), windows=kwargs["windows"],
                     ratio=kwargs["ratio"], explicit=which)
    return described, dtype, (k, v, text), kwargs


def check_dense(maker, rng, g):
    described, dtype, (k, v, text), kwargs = maker(rng, g)
    before = [bits(x).clone() for x in (k, v, text)]
    got = lightkv_ext.compress(k, v, text, **kwargs)
    found = mismatches(got, reference.compress(k, v, text, **kwargs), dtype)
    found += same_bits(got, lightkv_ext.compress(k, v, text, **kwargs))
    if kwargs["ratio"] == 0 and not (torch.equal(bits(got.k), bits(k)) and torch.equal(bits(got.v), bits(v))):
        found.append("ratio 0 changed k or v")
    if any(not torch.equal(b, bits(x)) for b, x in zip(before, (k, v, text))):
        found.append("an input was modified")
    return described, found


def varlen_mismatches(out, inputs, spans, dtype, call):
    """What differs between compress_varlen(*inputs, **call) = out and reference.compress on each
    image alone, image i scored against the text rows spans[i] = (start, end)."""
    k, v, text = inputs
    cu, found = call["cu_seqlens"].tolist(), []
    for i, grid in enumerate(call["grids"]):
        rows, kept = slice(cu[i], cu[i + 1]), slice(int(out.cu_seqlens[i]), int(out.cu_seqlens[i + 1]))
        start, end = spans[i]
        image_text, mask = (text[start:end], None) if end > start else (text[:1], torch.zeros(1, 1, dtype=torch.bool))
        earlier = {name: call[name][rows][None] for name in ("sizes", "positions") if name in call}
        want = reference.compress(k[rows].permute(1, 0, 2)[None], v[rows].permute(1, 0, 2)[None],
                                  image_text.permute(1, 0, 2)[None], ratio=call["ratio"], windows=call["windows"],
                                  grid=grid, text_mask=mask, **earlier)
        got = want._replace(k=out.k[kept], v=out.v[kept], sizes=out.sizes[kept][None], index=out.index[kept][None],
                            assignment=out.assignment[rows][None], importance=out.importance[rows][None])
        found += [f"image {i}: {m}" for m in mismatches(got, want, dtype, layout=lambda x: x[0].transpose(0, 1))]
    return found


def check_varlen(rng, g):
    """compress_varlen on a pack equals reference.compress on each image alone."""
    dtype = rng.choice(DTYPES)
    windows = rng.choice([(1, 1), (2, 2), (3, 3), (2, 1)])
    ratio = rng.choice([0.0, 0.3, 0.5, 0.9])
    grids = [(rng.randint(windows[0], 14), rng.randint(windows[1], 14))
             for _ in range(rng.choice([1, 2, 5, 8, 9, 12]))]  # past 8 images: tables not built in-kernel
    H_kv = rng.choice([1, 2, 4])
    H_q, D = H_kv * rng.choice([1, 2, 3]), rng.choice([16, 40, 64, 128])
    cu = [0]
    for h, w in grids:
        cu.append(cu[-1] + h * w)
    if rng.random() < 0.7:  # a text span per image, some empty
        cut = [0]
        for _ in grids:
            cut.append(cut[-1] + rng.choice([0, 1, 5, 64, 70]))
        total_text, spans = max(cut[-1], 1), list(zip(cut[:-1], cut[1:]))
    else:  # spans anywhere in the text, shared and overlapping
        total_text = rng.randint(1, 80)
        spans = [tuple(sorted((rng.randint(0, total_text), rng.randint(0, total_text)))) for _ in grids]
    k, v = (torch.randn(cu[-1], H_kv, D, generator=g).to(dtype) for _ in range(2))
    text = torch.randn(total_text, H_q, D, generator=g).to(dtype)
    call = dict(cu_seqlens=torch.tensor(cu, dtype=torch.int32), grids=grids, text_ranges=spans, ratio=ratio,
                windows=windows)
    second_stage = rng.random() < 0.2
    if second_stage:  # on the survivors of a first stage, windowed on the original grids
        first = lightkv_ext.compress_varlen(k, v, text, **dict(call, ratio=0.5))
        k, v = first.k, first.v
        call.update(cu_seqlens=first.cu_seqlens, sizes=first.sizes, positions=first.index,
                    windows=(max(1, windows[0] // 2), max(1, windows[1] // 2)))
    out = lightkv_ext.compress_varlen(k, v, text, **call)
    found = same_bits(out, lightkv_ext.compress_varlen(k, v, text, **call))
    found += varlen_mismatches(out, (k, v, text), spans, dtype, call)
    described = dict(dtype=str(dtype), grids=grids, H_kv=H_kv, H_q=H_q, D=D, windows=call["windows"], ratio=ratio,
                     text_spans=spans, second_stage=second_stage)
    return described, found


def run_case(case_seed):
    rng = random.Random(case_seed)
    g = torch.Generator().manual_seed(case_seed)
    knobs = set_knobs(rng)
    kind = rng.choices(["dense", "explicit", "varlen"], weights=[6, 1, 3])[0]
    if kind == "varlen":
        described, found = check_varlen(rng, g)
    else:
        described, found = check_dense(dense_case if kind == "dense" else explicit_case, rng, g)
    return f"{kind} {described} {knobs}", found


def main():
    emulated_ops.install()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the cases' seeds")
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--seconds", type=float, default=None, help="stop starting cases after this long")
    parser.add_argument("--case", type=int, default=None, help="run only the case of this seed")
    args = parser.parse_args()
    seeds = random.Random(args.seed)
    end = time.time() + args.seconds if args.seconds is not None else float("inf")
    count = failures = 0
    while time.time() < end and (args.cases is None or count < args.cases):
        case_seed = args.case if args.case is not None else seeds.randrange(1 << 31)
        start = time.time()
        try:
            description, found = run_case(case_seed)
        except Exception as error:  # a raise is a failure of the case, not of the run
            description, found = "(raised)", [repr(error)]
        count += 1
        failures += bool(found)
        status = "FAIL" if found else "ok  "
        print(f"{status} case {case_seed} ({time.time() - start:.1f} s): {description}", flush=True)
        for line in found:
            print("     ", line, flush=True)
        if args.case is not None:
            break
    print(f"cases: {count} failures: {failures}")
    sys.exit(1 if failures or count == 0 else 0)


if __name__ == "__main__":
    main()
