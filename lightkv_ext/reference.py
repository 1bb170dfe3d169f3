"""Pure-PyTorch reference of SPEC: the oracle of every backend and the eager benchmark baseline.

Dense layout only (k, v: (B, H_kv, N, D)); ``compress_varlen`` is defined as per-image
``compress``. Batched over rows and windows by padding each window to the largest one.
"""
from __future__ import annotations

import torch

from ._validate import compress_args, same_kept_per_row, score_args
from .types import Compressed
from .windows import merge_count, window_labels


def score(k, text_emb, *, text_mask=None, scale=None, sizes=None) -> torch.Tensor:
    """Prompt attention mass per vision token, (B, N) float32 (SPEC step 1)."""
    args = score_args(k, text_emb, text_mask=text_mask, scale=scale, sizes=sizes)
    return _score(k, text_emb, args.text_mask, args.scale, args.sizes)


def _score(k, text_emb, text_mask, scale, sizes):
    B, H_kv, N, D = k.shape
    H_q, T = text_emb.shape[1], text_emb.shape[2]
    queries = text_emb.float().reshape(B, H_kv, H_q // H_kv, T, D)
    logits = scale * torch.einsum("bhgtd,bhnd->bhgtn", queries, k.float())
    if sizes is not None:
        logits = logits + sizes.float().log()[:, None, None, None, :]
    if text_mask is None:
        text_mask = torch.ones(B, T, dtype=torch.bool, device=k.device)
    probs = logits.softmax(dim=-1) * text_mask.float()[:, None, None, :, None]
    n_text = text_mask.sum(dim=-1, keepdim=True)
    importance = probs.sum(dim=(1, 2, 3)) / (H_q * n_text.clamp(min=1))
    return torch.where(n_text == 0, torch.full_like(importance, 1.0 / N), importance)


def compress(k, v, text_emb, *, ratio=0.5, windows=1, grid=None, text_mask=None, scale=None,
             importance=None, metric=None, sizes=None, positions=None) -> Compressed:
    """Merge redundant vision tokens of k and v (SPEC steps 1-5)."""
    args = compress_args(k, v, text_emb, ratio=ratio, windows=windows, grid=grid, text_mask=text_mask,
                         scale=scale, importance=importance, metric=metric, sizes=sizes,
                         positions=positions)
    B, H, N, D = k.shape
    importance = args.importance
    if importance is None:
        importance = _score(k, text_emb, args.text_mask, args.scale, args.sizes)
    if metric is None:
        metric = k.transpose(1, 2).reshape(B, N, H * D)
    sizes = torch.ones(B, N, dtype=torch.int32, device=k.device) if sizes is None else args.sizes

    positions = torch.arange(N, device=k.device).expand(B, N) if args.positions is None else args.positions
    labels = window_labels(positions, args.grid, args.windows)
    dest = _match(metric, labels, args.windows, args.ratio)

    kept = dest == torch.arange(N, device=k.device)
    M = same_kept_per_row(kept.sum(dim=1).tolist())
    index = kept.nonzero()[:, 1].reshape(B, M)
    slot = kept.cumsum(dim=1) - 1
    assignment = slot.gather(1, dest)
    return Compressed(
        k=_merge(k, importance, assignment, index),
        v=_merge(v, importance, assignment, index),
        sizes=torch.zeros(B, M, dtype=torch.int32, device=k.device).scatter_add_(1, assignment, sizes),
        index=index,
        assignment=assignment,
        importance=importance,
    )


def _match(metric, labels, windows, ratio):
    """dest[b, i]: the input position token i is merged into (itself when kept). SPEC step 3."""
    B, N = labels.shape
    device = labels.device
    n_windows = windows[0] * windows[1]
    # Pad every window of every row to the largest one: members[w, p] = token at position p.
    flat_label = (labels + n_windows * torch.arange(B, device=device)[:, None]).reshape(-1)
    order = torch.sort(flat_label, stable=True).indices
    counts = torch.bincount(flat_label, minlength=B * n_windows)
    starts = counts.cumsum(0) - counts
    sorted_label = flat_label[order]
    pos_in_window = torch.arange(B * N, device=device) - starts[sorted_label]
    members = torch.full((B * n_windows, int(counts.max())), -1, dtype=torch.long, device=device)
    members[sorted_label, pos_in_window] = order

    src, dst = members[:, 0::2], members[:, 1::2]
    if dst.shape[1] == 0:  # every window holds a single token: nothing to merge
        return torch.arange(N, device=device).expand(B, N)
    vectors = metric.reshape(B * N, -1).double()
    a, b = vectors[src.clamp(min=0)], vectors[dst.clamp(min=0)]
    norms = a.norm(dim=-1)[:, :, None] * b.norm(dim=-1)[:, None, :]
    sim = (a @ b.transpose(1, 2)) / (norms + 1e-8)
    # A matrix product can round the dot products of equal vectors differently at different
    # positions, but SPEC's tie rules need equal vectors to score the same: every src row and dst
    # column takes the scores of the first equal vector of its window.
    keys = _vector_keys(vectors)
    first_src, first_dst = _first_equal(a, src, keys), _first_equal(b, dst, keys)
    sim = sim.gather(1, first_src[:, :, None].expand_as(sim)).gather(2, first_dst[:, None, :].expand_as(sim))
    sim = sim.masked_fill((dst < 0)[:, None, :], float("-inf"))
    best = sim.argmax(dim=-1)  # first maximum: ties go to the lowest dst position
    best_score = sim.gather(-1, best[:, :, None])[:, :, 0].masked_fill(src < 0, float("-inf"))
    rank_order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    r = torch.tensor([merge_count(int(n), ratio) for n in counts.tolist()], device=device)
    merged = torch.zeros_like(src, dtype=torch.bool).scatter_(
        1, rank_order, torch.arange(src.shape[1], device=device)[None, :] < r[:, None])

    dest = torch.arange(B * N, device=device)
    dest[src[merged]] = dst.gather(1, best)[merged]
    return (dest.reshape(B, N) - N * torch.arange(B, device=device)[:, None])


def _vector_keys(vectors):
    """A number per row that equal rows share wherever they are and unequal rows almost never do: a
    sum of the row times random weights. Unlike a matrix product, a row sum rounds alike for rows
    laid out alike, so the products go to rows padded with zeros to 64 bytes (one alignment)."""
    n, width = vectors.shape
    weights = torch.rand(width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    products = vectors.new_zeros(n, -(-width // 8) * 8)
    torch.mul(vectors, weights.to(vectors.device), out=products[:, :width])
    return products.sum(dim=-1)


def _first_equal(rows, members, keys):
    """rows[w, p] = vector of members[w, p] -> position of the first member of window w with an
    equal vector (p itself when none comes before it, or when the first one with its key differs)."""
    key = keys[members.clamp(min=0)]
    first = (key[:, :, None] == key[:, None, :]).byte().argmax(dim=-1)
    window, position = (first != torch.arange(members.shape[1], device=members.device)).nonzero(as_tuple=True)
    unequal = (rows[window, first[window, position]] != rows[window, position]).any(dim=-1)  # equal keys only
    first[window[unequal], position[unequal]] = position[unequal]
    return first


def _merge(x, importance, assignment, index):
    """Importance-weighted average of every group (SPEC step 4), x: (B, H, N, D)."""
    B, H, N, D = x.shape
    M = index.shape[1]
    xf = x.float()
    group = assignment[:, None, :, None].expand(B, H, N, D)
    weight_sum = torch.zeros(B, M, device=x.device).scatter_add_(1, assignment, importance)
    members = torch.zeros(B, M, device=x.device).scatter_add_(1, assignment, torch.ones_like(importance))
    weighted = torch.zeros(B, H, M, D, device=x.device).scatter_add_(2, group, xf * importance[:, None, :, None])
    plain = torch.zeros(B, H, M, D, device=x.device).scatter_add_(2, group, xf)
    zero_weight = (weight_sum == 0)[:, None, :, None]
    merged = torch.where(zero_weight, plain / members[:, None, :, None],
                         weighted / weight_sum[:, None, :, None].clamp(min=torch.finfo(torch.float32).tiny))
    alone = (members == 1)[:, None, :, None]
    anchors = x.gather(2, index[:, None, :, None].expand(B, H, M, D))
    return torch.where(alone, anchors, merged.to(x.dtype))
