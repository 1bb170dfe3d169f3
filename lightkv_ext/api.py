"""Public API: validation, window layout, and dispatch to the native ops (CPU or CUDA)."""
from __future__ import annotations

import functools

import torch

from . import ops
from ._validate import compress_args, same_kept_per_row, score_args, varlen_args
from .types import Compressed, CompressedVarlen
from .windows import full_grid_layout, positions_layout, ready_for_any_stream


def _is_foreign_array(x) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__")


def _interop(fn):
    """Accept any DLPack array (e.g. CuPy) in place of a tensor, zero-copy; when k is a CuPy
    array, the tensors of the result come back as CuPy arrays."""

    def to_torch(x):
        return torch.from_dlpack(x) if _is_foreign_array(x) else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not any(map(_is_foreign_array, args)) and not any(map(_is_foreign_array, kwargs.values())):
            return fn(*args, **kwargs)  # nothing to convert: the common case, kept cheap
        first = args[0] if args else kwargs.get("k")
        cupy_in = type(first).__module__.split(".")[0] == "cupy"
        out = fn(*map(to_torch, args), **{name: to_torch(x) for name, x in kwargs.items()})
        if not cupy_in:
            return out
        import cupy

        if isinstance(out, torch.Tensor):
            return cupy.from_dlpack(out)
        return type(out)(*(cupy.from_dlpack(x) for x in out))

    return wrapper


@functools.lru_cache(maxsize=64)
def _dense_images(batch: int, n_tokens: int, n_text: int, device: torch.device) -> torch.Tensor:
    """Image table of ``lightkv::score`` for the dense layout: one image per row."""
    rows = torch.arange(batch, dtype=torch.int64)[:, None]
    table = torch.tensor([[0, 0, n_tokens, 0, n_text]], dtype=torch.int64).repeat(batch, 1)
    table[:, :1] = rows
    return ready_for_any_stream(table.to(device))


@functools.lru_cache(maxsize=64)
def _varlen_tables(starts: tuple, text_ranges: tuple, kept: tuple, device: torch.device):
    """Tables of a varlen pack that depend on its shapes only, built on the host and moved to the
    device once: the image table of ``lightkv::score``, the output offsets, and the ops'
    ``local_bases``: per input token the first row of its image in the input and in the output,
    which the ops subtract from index and assignment (image-local numbers)."""
    counts = torch.tensor([b - a for a, b in zip(starts, starts[1:])], dtype=torch.int64)
    images = torch.tensor([[0, start, n, t0, t1 - t0] for start, n, (t0, t1)
                           in zip(starts, counts.tolist(), text_ranges)], dtype=torch.int64).reshape(-1, 5)
    cu_out = torch.zeros(len(kept) + 1, dtype=torch.int32)
    torch.cumsum(torch.tensor(kept, dtype=torch.int64), 0, out=cu_out[1:])
    local_bases = torch.stack([torch.tensor(starts[:-1], dtype=torch.int64).repeat_interleave(counts),
                               cu_out[:-1].long().repeat_interleave(counts)])[:, None]
    return tuple(ready_for_any_stream(t.to(device)) for t in (images, cu_out, local_bases))


@functools.lru_cache(maxsize=64)
def _unit_sizes(shape: tuple, device: torch.device) -> torch.Tensor:
    """Token counts of a first-stage cache: all ones (the ops never write their inputs)."""
    return ready_for_any_stream(torch.ones(shape, dtype=torch.int32, device=device))


@_interop
def score(k, text_emb, *, text_mask=None, scale=None, sizes=None) -> torch.Tensor:
    """Prompt attention mass per vision token, ``(B, N)`` float32, each row summing to 1.

    ``k``: (B, H_kv, N, D) vision keys; ``text_emb``: (B, H_q, T, D) text queries of the same
    layer; ``text_mask``: (B, T) bool, True for real text tokens; ``sizes``: (B, N) token counts
    (adds log(sizes) to the logits, proportional attention).
    """
    args = score_args(k, text_emb, text_mask=text_mask, scale=scale, sizes=sizes)
    images = _dense_images(k.shape[0], k.shape[2], text_emb.shape[2], k.device)
    return ops.score(k, text_emb, images, text_mask, args.sizes, args.scale, k.shape[0] * text_emb.shape[2])


@_interop
def compress(k, v, text_emb, *, ratio=0.5, windows=1, grid=None, text_mask=None, scale=None,
             importance=None, metric=None, sizes=None, positions=None) -> Compressed:
    """Merge redundant vision tokens of one layer's KV cache, guided by the text prompt.

    See the README and SPEC for the arguments. Returns :class:`Compressed` with ``M`` kept tokens
    per row, in the order of the input (the 2-D layout survives).
    """
    args = compress_args(k, v, text_emb, ratio=ratio, windows=windows, grid=grid, text_mask=text_mask,
                         scale=scale, importance=importance, metric=metric, sizes=sizes,
                         positions=positions)
    B, H, N, D = k.shape
    if positions is None:
        layout = full_grid_layout((args.grid,) * B, (args.windows,) * B, args.ratio, k.device)
    else:
        layout = positions_layout(args.positions.reshape(-1), [args.grid] * B, [args.windows] * B,
                                  range(0, B * N + 1, N), args.ratio)
    kept = same_kept_per_row(layout.kept)
    metric = k.permute(0, 2, 1, 3) if metric is None else metric.unsqueeze(2)
    token_sizes = args.sizes if args.sizes is not None else _unit_sizes((B, N), k.device)
    merge_args = (layout.tokens, layout.offsets, args.ratio, kept, layout.max_window, False)
    if args.importance is None:  # one op: scoring and the merge decisions may overlap (CUDA)
        images = _dense_images(B, N, text_emb.shape[2], k.device)
        return Compressed(*ops.compress(k, v, text_emb, images, text_mask, token_sizes, args.scale, metric,
                                        *merge_args, B * text_emb.shape[2]))
    return Compressed(*ops.merge(k, v, metric, args.importance, token_sizes, *merge_args), args.importance)


@_interop
def compress_varlen(k, v, text_emb, cu_seqlens, grids, *, cu_seqlens_text=None, text_ranges=None,
                    ratio=0.5, windows=1, scale=None, importance=None, metric=None, sizes=None,
                    positions=None) -> CompressedVarlen:
    """:func:`compress` over a pack of images with different grids (flash-attn varlen layout).

    ``k, v``: (total_N, H_kv, D), image ``i`` at rows ``cu_seqlens[i]:cu_seqlens[i + 1]`` with grid
    ``grids[i] = (h, w)``; ``text_emb``: (total_T, H_q, D); image ``i`` is scored against the text
    rows ``cu_seqlens_text[i]:cu_seqlens_text[i + 1]`` or ``text_ranges[i] = (start, end)``
    (default: all text rows). ``importance``, ``sizes``, ``positions``: (total_N,), positions
    local to each image's grid; ``metric``: (total_N, C). Same ``ratio`` and ``windows`` for all
    images. Equal to calling :func:`compress` on each image alone.
    """
    args = varlen_args(k, v, text_emb, cu_seqlens, grids, cu_seqlens_text=cu_seqlens_text,
                       text_ranges=text_ranges, ratio=ratio, windows=windows, scale=scale,
                       importance=importance, metric=metric, sizes=sizes, positions=positions)
    device = k.device
    keys, values = k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None]
    if positions is None:
        layout = full_grid_layout(tuple(args.grids), tuple(args.windows), args.ratio, device)
    else:
        layout = positions_layout(args.positions, args.grids, args.windows, args.starts, args.ratio)
    metric = k[None] if metric is None else metric[None, :, None, :]
    token_sizes = (args.sizes if args.sizes is not None else _unit_sizes((k.shape[0],), device))[None]
    merge_args = (layout.tokens, layout.offsets, args.ratio, sum(layout.kept), layout.max_window, True)
    images, cu_out, local_bases = _varlen_tables(
        tuple(args.starts), tuple((int(t0), int(t1)) for t0, t1 in args.text_ranges), tuple(layout.kept), device)
    if args.importance is None:
        # The text rows the images score, summed on the host: the CUDA op sizes its softmax
        # statistics by them without reading the image table back.
        text_rows = sum(t1 - t0 for t0, t1 in args.text_ranges)
        *merged, importance = ops.compress(keys, values, text_emb.permute(1, 0, 2)[None], images, None,
                                           token_sizes, args.scale, metric, *merge_args, text_rows, local_bases)
        importance = importance[0]
    else:
        importance = args.importance
        merged = ops.merge(keys, values, metric, importance[None], token_sizes, *merge_args, local_bases)
    k_out, v_out, sizes_out, index, assignment = merged
    return CompressedVarlen(
        k=k_out[0].transpose(0, 1),
        v=v_out[0].transpose(0, 1),
        cu_seqlens=cu_out.clone(),
        sizes=sizes_out[0],
        index=index[0],
        assignment=assignment[0],
        importance=importance,
    )
