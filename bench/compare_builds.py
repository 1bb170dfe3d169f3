"""Bitwise comparison of two builds of lightkv_ext on the same inputs: the correctness half of an A/B.

    python bench/compare_builds.py --save OUT.pt [--cases llava15:1 qwen25vl:1 ...] [--dtype bfloat16]
    python bench/compare_builds.py --compare A.pt B.pt

`--save` runs each case (a bench_kernels.py preset and a batch size, its seeded inputs) through
the `lightkv_ext` that Python imports, and saves every output of the call (compressed k and v,
sizes, index, assignment, importance). Run it once per build, each with its own tree first on
PYTHONPATH (gpu_check.sh: this tree, then GPU_CHECK_BASELINE's). `--compare` lists, per case and
output, whether the two files hold the same bits, and exits non-zero if any differ.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch

import lightkv_ext
from _timing import cli_device
from bench_kernels import PRESETS, RATIO, make_case

DEFAULT_CASES = ("llava15:1", "llava15:4", "qwen25vl:1", "qwen25vl:2", "video:1", "llava_next:1", "video16k:1")


def outputs(case) -> Dict[str, torch.Tensor]:
    """Every output of the case's compress (dense or varlen), by name."""
    preset = case.preset
    if preset.varlen:
        out = lightkv_ext.compress_varlen(case.k, case.v, case.text, case.cu_seqlens, case.grids,
                                          cu_seqlens_text=case.cu_seqlens_text, ratio=RATIO, windows=preset.windows)
    else:
        (grid,) = preset.grids
        out = lightkv_ext.compress(case.k, case.v, case.text, ratio=RATIO, windows=preset.windows, grid=grid)
    return {name: value.cpu() for name, value in out._asdict().items() if isinstance(value, torch.Tensor)}


def save(cases: List[str], dtype: torch.dtype, device: torch.device, path: str) -> None:
    results = {}
    for text in cases:
        name, batch = text.split(":")
        results[text] = outputs(make_case(PRESETS[name], int(batch), dtype, device))
    torch.save({"module": lightkv_ext.__file__, "results": results}, path)
    print(f"saved {len(results)} cases of {lightkv_ext.__file__} to {path}")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def compare(path_a: str, path_b: str) -> bool:
    a, b = torch.load(path_a), torch.load(path_b)
    print(f"A: {a['module']}\nB: {b['module']}")
    identical = True
    for case, outs in a["results"].items():
        other = b["results"].get(case)
        if other is None:
            print(f"{case}: only in A")
            identical = False
            continue
        differ = [name for name, value in outs.items() if name not in other or not same_bits(value, other[name])]
        identical = identical and not differ
        print(f"{case}: " + (f"differ in {', '.join(differ)}" if differ else f"identical ({', '.join(outs)})"))
    return identical


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", metavar="PATH")
    action.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="PRESET:BATCH ...")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.compare:
        return 0 if compare(*args.compare) else 1
    save(args.cases, getattr(torch, args.dtype), cli_device(args.device), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
