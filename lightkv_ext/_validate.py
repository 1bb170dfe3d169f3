"""Argument checks of the public API: every misuse raises ValueError / TypeError naming the
argument, what was expected and what was given. Also normalises the optional arguments."""
from __future__ import annotations

import math
import numbers
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in x.shape) + ")"


_EXPECTED_DTYPE = {"float": "float32, float16 or bfloat16", "any_float": "a floating dtype",
                   "int": "an integer dtype", "bool": "torch.bool"}


def _dtype_is(kind: str, dtype: torch.dtype) -> bool:
    if kind == "float":
        return dtype in FLOAT_DTYPES
    if kind == "any_float":
        return dtype.is_floating_point
    if kind == "int":
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return dtype == torch.bool


def tensor(name: str, x, dims: str, *, device: Optional[torch.device] = None, kind: str = "float") -> torch.Tensor:
    """Check that ``x`` is a non-empty tensor of rank ``dims.count(',') + 1`` on ``device``.

    ``kind``: "float" (float32/float16/bfloat16), "any_float", "int" or "bool".
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({dims}), got {type(x).__name__}")
    rank = dims.count(",") + 1
    if x.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor of shape ({dims}), got shape {_shape(x)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor of shape ({dims}), got shape {_shape(x)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of k), got one on {x.device}")
    if not _dtype_is(kind, x.dtype):
        raise TypeError(f"{name}: expected dtype {_EXPECTED_DTYPE[kind]}, got {x.dtype}")
    return x


def expect_shape(name: str, x: torch.Tensor, shape: Tuple[int, ...], dims: str) -> None:
    if x.shape != shape:
        want = "(" + ", ".join(str(n) for n in shape) + ")"
        raise ValueError(f"{name}: expected shape ({dims}) = {want}, got {_shape(x)}")


def ratio_arg(ratio) -> float:
    if type(ratio) is float and 0.0 <= ratio < 1.0:  # the common case, without the ABC check
        return ratio
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio: expected a float in [0, 1), got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio: expected a float in [0, 1), got {ratio}")
    return float(ratio)


def scale_arg(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a positive float or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    return float(scale)


def _is_int(n) -> bool:
    """An integer that is not a bool (``type(n) is int`` first: the ABC check costs ~1 µs)."""
    return type(n) is int or (isinstance(n, numbers.Integral) and not isinstance(n, bool))


def _int_pair(name: str, value, what: str) -> Tuple[int, int]:
    pair = (value, value) if name == "windows" and _is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not (_is_int(pair[0]) and _is_int(pair[1])):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name}: expected positive sizes, got {value!r}")
    return int(pair[0]), int(pair[1])


def windows_arg(windows, grid: Tuple[int, int]) -> Tuple[int, int]:
    ph, pw = _int_pair("windows", windows, "an int p (p x p windows) or a tuple (ph, pw)")
    if ph > grid[0] or pw > grid[1]:
        raise ValueError(f"windows: ({ph}, {pw}) windows do not fit the grid {tuple(grid)}: "
                         f"expected 1 <= ph <= {grid[0]} and 1 <= pw <= {grid[1]}")
    return ph, pw


def grid_arg(grid, n_tokens: int, has_positions: bool) -> Tuple[int, int]:
    if grid is None:
        side = math.isqrt(n_tokens)
        if has_positions or side * side != n_tokens:
            why = "positions are given" if has_positions else f"N = {n_tokens} is not a perfect square"
            raise ValueError(f"grid: cannot infer the grid because {why}; pass grid=(h, w)")
        return side, side
    h, w = _int_pair("grid", grid, "a tuple (h, w) of positive ints")
    if not has_positions and h * w != n_tokens:
        raise ValueError(f"grid: expected h * w == N = {n_tokens} vision tokens, got grid {(h, w)} "
                         f"with {h * w} cells")
    if has_positions and n_tokens > h * w:
        raise ValueError(f"grid: {n_tokens} tokens do not fit the grid {(h, w)} of {h * w} cells")
    return h, w


def weights_arg(importance: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(importance) | (importance < 0)
    if bool(bad.any()):
        raise ValueError("importance: expected finite non-negative weights, got "
                         f"{int(bad.sum())} negative, NaN or Inf value(s)")
    return importance.float()


def sizes_arg(sizes: torch.Tensor) -> torch.Tensor:
    if bool(((sizes < 1) | (sizes > torch.iinfo(torch.int32).max)).any()):
        raise ValueError("sizes: expected token counts >= 1 that fit int32")
    return sizes.to(torch.int32)


def positions_arg(parts: Sequence[torch.Tensor], grids: Sequence[Tuple[int, int]], names: Sequence[str]) -> None:
    """Each ``parts[i]`` (..., N): cells of ``grids[i]``, strictly increasing along the last dim.
    The flags of all parts are read back in one transfer (one sync on a GPU, not two per part)."""
    flags = torch.stack([torch.stack([((part < 0) | (part >= grid[0] * grid[1])).any(),
                                      (part[..., 1:] <= part[..., :-1]).any()])
                         for part, grid in zip(parts, grids)]).tolist()
    for (outside, unordered), grid, name in zip(flags, grids, names):
        if outside:
            raise ValueError(f"{name}: expected grid cells in [0, {grid[0] * grid[1]}) for grid {tuple(grid)}")
        if unordered:
            raise ValueError(f"{name}: expected strictly increasing cells along each row")


def same_kept_per_row(kept: Sequence[int]) -> int:
    if len(set(kept)) != 1:
        raise ValueError(
            f"positions: the rows would keep different numbers of tokens ({sorted(set(kept))}), "
            "but the dense API returns one M for all rows; use compress_varlen for such batches")
    return kept[0]


def score_args(k, text_emb, *, text_mask, scale, sizes) -> SimpleNamespace:
    tensor("k", k, "B, H_kv, N, D")
    device = k.device
    tensor("text_emb", text_emb, "B, H_q, T, D", device=device)
    B, H_kv, N, D = k.shape
    H_q, T = text_emb.shape[1], text_emb.shape[2]
    if text_emb.dtype != k.dtype:
        raise TypeError(f"text_emb: expected the dtype of k ({k.dtype}), got {text_emb.dtype}")
    if text_emb.shape[0] != B or text_emb.shape[3] != D:
        raise ValueError(f"text_emb: expected shape (B, H_q, T, D) with B = {B} and D = {D} as in k, "
                         f"got {_shape(text_emb)}")
    if H_q % H_kv != 0:
        raise ValueError(f"text_emb: query heads H_q = {H_q} must be a multiple of the KV heads "
                         f"H_kv = {H_kv} of k")
    if text_mask is not None:  # None: every text token counts
        tensor("text_mask", text_mask, "B, T", device=device, kind="bool")
        expect_shape("text_mask", text_mask, (B, T), "B, T")
    if sizes is not None:
        tensor("sizes", sizes, "B, N", device=device, kind="int")
        expect_shape("sizes", sizes, (B, N), "B, N")
        sizes = sizes_arg(sizes)
    return SimpleNamespace(text_mask=text_mask, scale=scale_arg(scale, D), sizes=sizes)


def compress_args(k, v, text_emb, *, ratio, windows, grid, text_mask, scale, importance, metric, sizes,
                  positions) -> SimpleNamespace:
    args = score_args(k, text_emb, text_mask=text_mask, scale=scale, sizes=sizes)
    B, H_kv, N, D = k.shape
    device = k.device
    tensor("v", v, "B, H_kv, N, D", device=device)
    if v.dtype != k.dtype:
        raise TypeError(f"v: expected the dtype of k ({k.dtype}), got {v.dtype}")
    expect_shape("v", v, k.shape, "B, H_kv, N, D")
    args.ratio = ratio_arg(ratio)
    if positions is not None:
        tensor("positions", positions, "B, N", device=device, kind="int")
        expect_shape("positions", positions, (B, N), "B, N")
    args.grid = grid_arg(grid, N, positions is not None)
    args.windows = windows_arg(windows, args.grid)
    if positions is not None:
        positions_arg([positions], [args.grid], ["positions"])
    args.positions = None if positions is None else positions.long()  # None: raster order
    if importance is not None:
        tensor("importance", importance, "B, N", device=device, kind="any_float")
        expect_shape("importance", importance, (B, N), "B, N")
        importance = weights_arg(importance)
    args.importance = importance
    if metric is not None:
        tensor("metric", metric, "B, N, C", device=device, kind="any_float")
        if tuple(metric.shape[:2]) != (B, N):
            raise ValueError(f"metric: expected shape (B, N, C) with B = {B}, N = {N}, got {_shape(metric)}")
    return args


def _host_ints(name: str, value, dims: str) -> list:
    """A 1-D integer tensor or sequence as a host list."""
    if isinstance(value, torch.Tensor):
        tensor(name, value, dims, kind="int")
        return value.tolist()
    if (not isinstance(value, (list, tuple)) or not value
            or not all(_is_int(n) for n in value)):
        raise TypeError(f"{name}: expected a 1-D integer tensor or a list of ints ({dims}), got {value!r}")
    return [int(n) for n in value]


def offsets_arg(name: str, value, total: int, total_name: str, *, allow_empty: bool) -> list:
    """``cu_seqlens``-style offsets: starts at 0, ends at ``total``, increasing."""
    offsets = _host_ints(name, value, "I + 1")
    steps = [b - a for a, b in zip(offsets, offsets[1:])]
    if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total
            or any(s < (0 if allow_empty else 1) for s in steps)):
        order = "non-decreasing" if allow_empty else "strictly increasing"
        raise ValueError(f"{name}: expected {order} offsets from 0 to {total_name} = {total} "
                         f"(I + 1 entries for I images), got {offsets}")
    return offsets


def varlen_args(k, v, text_emb, cu_seqlens, grids, *, cu_seqlens_text, text_ranges, ratio, windows,
                scale, importance, metric, sizes, positions) -> SimpleNamespace:
    tensor("k", k, "total_N, H_kv, D")
    device = k.device
    tensor("v", v, "total_N, H_kv, D", device=device)
    tensor("text_emb", text_emb, "total_T, H_q, D", device=device)
    total_n, H_kv, D = k.shape
    total_t, H_q = text_emb.shape[0], text_emb.shape[1]
    for name, x in (("v", v), ("text_emb", text_emb)):
        if x.dtype != k.dtype:
            raise TypeError(f"{name}: expected the dtype of k ({k.dtype}), got {x.dtype}")
    expect_shape("v", v, k.shape, "total_N, H_kv, D")
    if text_emb.shape[2] != D:
        raise ValueError(f"text_emb: expected head dim D = {D} as in k, got shape {_shape(text_emb)}")
    if H_q % H_kv != 0:
        raise ValueError(f"text_emb: query heads H_q = {H_q} must be a multiple of the KV heads "
                         f"H_kv = {H_kv} of k")
    starts = offsets_arg("cu_seqlens", cu_seqlens, total_n, "total_N", allow_empty=False)
    n_images = len(starts) - 1
    counts = [b - a for a, b in zip(starts, starts[1:])]

    if isinstance(grids, torch.Tensor):
        tensor("grids", grids, "I, 2", kind="int")
        grids = grids.tolist()
    if not isinstance(grids, (list, tuple)) or len(grids) != n_images:
        raise ValueError(f"grids: expected one (h, w) per image ({n_images} images), got {grids!r}")
    grid_list = [grid_arg(g, n, positions is not None) for g, n in zip(grids, counts)]
    window_list = [windows_arg(windows, g) for g in grid_list]

    if cu_seqlens_text is not None and text_ranges is not None:
        raise ValueError("cu_seqlens_text, text_ranges: pass at most one of them")
    if cu_seqlens_text is not None:
        text_offsets = offsets_arg("cu_seqlens_text", cu_seqlens_text, total_t, "total_T", allow_empty=True)
        if len(text_offsets) != n_images + 1:
            raise ValueError(f"cu_seqlens_text: expected {n_images + 1} offsets (one text span per "
                             f"image), got {len(text_offsets)}")
        ranges = list(zip(text_offsets, text_offsets[1:]))
    elif text_ranges is not None:
        if isinstance(text_ranges, torch.Tensor):
            tensor("text_ranges", text_ranges, "I, 2", kind="int")
            text_ranges = text_ranges.tolist()
        ranges = [tuple(r) for r in text_ranges] if isinstance(text_ranges, (list, tuple)) else None
        if (ranges is None or len(ranges) != n_images
                or not all(len(r) == 2 and 0 <= r[0] <= r[1] <= total_t for r in ranges)):
            raise ValueError(f"text_ranges: expected {n_images} pairs (start, end) with "
                             f"0 <= start <= end <= total_T = {total_t}, got {text_ranges!r}")
    else:
        ranges = [(0, total_t)] * n_images

    if positions is not None:
        tensor("positions", positions, "total_N", device=device, kind="int")
        expect_shape("positions", positions, (total_n,), "total_N")
        positions_arg([positions[a:b] for a, b in zip(starts, starts[1:])], grid_list,
                      [f"positions (image {i})" for i in range(n_images)])
        positions = positions.long()
    if importance is not None:
        tensor("importance", importance, "total_N", device=device, kind="any_float")
        expect_shape("importance", importance, (total_n,), "total_N")
        importance = weights_arg(importance)
    if metric is not None:
        tensor("metric", metric, "total_N, C", device=device, kind="any_float")
        if metric.shape[0] != total_n:
            raise ValueError(f"metric: expected shape (total_N, C) with total_N = {total_n}, got {_shape(metric)}")
    if sizes is not None:
        tensor("sizes", sizes, "total_N", device=device, kind="int")
        expect_shape("sizes", sizes, (total_n,), "total_N")
        sizes = sizes_arg(sizes)
    return SimpleNamespace(starts=starts, counts=counts, grids=grid_list, windows=window_list,
                           text_ranges=ranges, ratio=ratio_arg(ratio), scale=scale_arg(scale, D),
                           positions=positions, importance=importance, sizes=sizes)
