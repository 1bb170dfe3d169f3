"""Spatial windows (SPEC step 2) and the window layout the native ``merge`` op consumes."""
from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import torch


def ready_for_any_stream(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, once the current stream has done all its work so far (which wrote it). For
    device tensors that are cached and then read by later calls on any stream: they wait here
    once, when built (not while a CUDA graph is being captured, where nothing runs yet)."""
    if tensor.is_cuda and not torch.cuda.is_current_stream_capturing():
        torch.cuda.current_stream(tensor.device).synchronize()
    return tensor


def merge_count(n: int, ratio: float) -> int:
    """Number of srcs merged in a window of ``n`` tokens: ``min(floor(ratio*n + 1e-6), n // 2)``."""
    return min(math.floor(float(ratio) * n + 1e-6), n // 2)


def band_of(coord: torch.Tensor, extent: int, bands: int) -> torch.Tensor:
    """Band index of each row (or column) ``coord`` when ``extent`` cells are cut into ``bands``.

    Bands hold ``extent // bands`` cells each, the first ``extent % bands`` one more.
    """
    small, n_large = divmod(extent, bands)
    large_end = n_large * (small + 1)
    return torch.where(
        coord < large_end,
        coord // (small + 1),
        n_large + (coord - large_end) // small,
    )


def window_labels(positions: torch.Tensor, grid: Tuple[int, int], windows: Tuple[int, int]) -> torch.Tensor:
    """Window label ``a * pw + c`` of every grid cell in ``positions`` (row-major cells)."""
    (h, w), (ph, pw) = grid, windows
    return band_of(positions // w, h, ph) * pw + band_of(positions % w, w, pw)


def window_sizes(grid: Tuple[int, int], windows: Tuple[int, int]) -> list:
    """Token count of every window when every grid cell holds a token (label order)."""
    (h, w), (ph, pw) = grid, windows
    rows = [h // ph + (a < h % ph) for a in range(ph)]
    cols = [w // pw + (c < w % pw) for c in range(pw)]
    return [r * c for r in rows for c in cols]


class WindowLayout:
    """Windows of a whole batch in CSR form, as ``lightkv::merge`` takes them.

    ``tokens`` holds flat token ids (``row * L + l``; for B dense rows of N tokens that is the
    concatenation of B images) grouped by window, raster order inside a window; window ``i`` is
    ``tokens[offsets[i]:offsets[i + 1]]``. ``kept`` lists, per image, how many tokens survive at
    ``ratio``; ``max_window`` is the largest window's token count.
    """

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, kept: Sequence[int], max_window: int):
        self.tokens = tokens
        self.offsets = offsets
        self.kept = list(kept)
        self.max_window = max_window


def _layout(labels: torch.Tensor, counts: Sequence[Sequence[int]], ratio: float) -> WindowLayout:
    """Layout from the flat global window label of every token (labels of image ``i`` above those
    of image ``i - 1``) and the token count of each window of each image."""
    tokens = torch.sort(labels, stable=True).indices
    sizes = torch.tensor([n for image in counts for n in image], dtype=torch.int64)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    kept = [sum(n - merge_count(n, ratio) for n in image) for image in counts]
    return WindowLayout(tokens, offsets.to(labels.device), kept, max((n for image in counts for n in image), default=0))


@functools.lru_cache(maxsize=64)
def full_grid_layout(grids: Tuple[Tuple[int, int], ...], windows: Tuple[Tuple[int, int], ...],
                     ratio: float, device: torch.device) -> WindowLayout:
    """Layout of images whose tokens fill their grids in raster order (no ``positions``), image
    ``i`` right after image ``i - 1``. Depends on shapes only, so it is cached."""
    labels, counts, base = [], [], 0
    for grid, win in zip(grids, windows):
        cells = torch.arange(grid[0] * grid[1], device=device)
        labels.append(window_labels(cells, grid, win) + base)
        counts.append(window_sizes(grid, win))
        base += win[0] * win[1]
    layout = _layout(torch.cat(labels), counts, ratio)
    ready_for_any_stream(layout.tokens)  # and the offsets: both were written on the current stream
    return layout


def positions_layout(positions: torch.Tensor, grids: Sequence[Tuple[int, int]],
                     windows: Sequence[Tuple[int, int]], starts: Sequence[int], ratio: float) -> WindowLayout:
    """Layout of images whose tokens sit at the cells ``positions`` (flat; image ``i`` at
    ``starts[i]:starts[i + 1]``) of their grids. Reads the window counts back to the host once."""
    labels = torch.empty_like(positions)
    bases = [0]
    for i, (grid, win) in enumerate(zip(grids, windows)):
        part = slice(starts[i], starts[i + 1])
        labels[part] = window_labels(positions[part], grid, win) + bases[-1]
        bases.append(bases[-1] + win[0] * win[1])
    flat_counts = torch.bincount(labels, minlength=bases[-1]).tolist()
    counts = [flat_counts[bases[i]:bases[i + 1]] for i in range(len(grids))]
    return _layout(labels, counts, ratio)
