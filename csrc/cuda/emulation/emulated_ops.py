"""lightkv::score / merge / compress over the CPU-emulated CUDA kernels, for CPU tensors.

The Python twin of csrc/cuda/ops_cuda.cpp (same output allocation, token_major included) over
libemulated.so built by run.sh. install() swaps them in for lightkv_ext.ops (check_reference.py,
random_cases.py).
"""
import ctypes
import os

import torch

lib = ctypes.CDLL(os.environ.get("LIGHTKV_EMULATED_LIB", os.path.join(os.path.dirname(__file__), "libemulated.so")))
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
P = ctypes.c_void_p


def arr(values):
    return (ctypes.c_int64 * len(values))(*values)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def score(k, text, images, text_mask, sizes, scale, text_rows=-1):
    out = torch.empty(k.shape[0], k.shape[2], dtype=torch.float32)
    images = images.contiguous()
    cap = text_rows if text_rows >= 0 else images.shape[0] * text.shape[2]
    rc = lib.emu_score(ptr(k), DT[k.dtype], arr(k.shape), arr(k.stride()), ptr(text), arr(text.shape),
                       arr(text.stride()), ptr(images), ctypes.c_int64(images.shape[0]), ptr(text_mask),
                       arr(text_mask.stride()) if text_mask is not None else None, ptr(sizes),
                       arr(sizes.stride()) if sizes is not None else None, ctypes.c_float(scale),
                       ctypes.c_int64(cap), ptr(out))
    assert rc == 0, rc
    return out


def merge(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window, token_major,
          local_bases=None):
    B, H, L, D = k.shape
    if token_major:
        k_out = torch.empty(B, kept, H, D, dtype=k.dtype).permute(0, 2, 1, 3)
        v_out = torch.empty(B, kept, H, D, dtype=k.dtype).permute(0, 2, 1, 3)
    else:
        k_out = torch.empty(B, H, kept, D, dtype=k.dtype)
        v_out = torch.empty(B, H, kept, D, dtype=k.dtype)
    sizes_out = torch.empty(B, kept, dtype=torch.int32)
    index = torch.empty(B, kept, dtype=torch.int64)
    assignment = torch.empty(B, L, dtype=torch.int64)
    importance, sizes = importance.contiguous(), sizes.contiguous()
    window_tokens, window_offsets = window_tokens.contiguous(), window_offsets.contiguous()
    local_bases = local_bases.contiguous() if local_bases is not None else None
    rc = lib.emu_merge(ptr(k), ptr(v), DT[k.dtype], arr(k.shape), arr(k.stride()), arr(v.stride()), ptr(metric),
                       DT[metric.dtype], arr(metric.shape), arr(metric.stride()), ptr(importance), ptr(sizes),
                       ptr(window_tokens), ctypes.c_int64(window_tokens.numel()), ptr(window_offsets),
                       ctypes.c_int64(window_offsets.numel() - 1), ctypes.c_double(ratio), ctypes.c_int64(kept),
                       ctypes.c_int64(max_window), ptr(k_out), ptr(v_out), arr(k_out.shape), arr(k_out.stride()),
                       arr(v_out.stride()), ptr(sizes_out), ptr(index), ptr(assignment), ptr(local_bases))
    assert rc == 0, rc
    return k_out, v_out, sizes_out, index, assignment


def compress(k, v, text, images, text_mask, sizes, scale, metric, window_tokens, window_offsets, ratio, kept,
             max_window, token_major, text_rows=-1, local_bases=None):
    importance = score(k, text, images, text_mask, sizes, scale, text_rows)
    merged = merge(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window,
                   token_major, local_bases)
    return (*merged, importance)


def install():
    """Route the public API's ops (lightkv_ext.ops) to these."""
    from lightkv_ext import ops
    ops.score, ops.merge, ops.compress = score, merge, compress
