"""The C++ CPU kernels of lightkv::score, lightkv::merge and lightkv::compress against the PyTorch
reference.

Most tests drive the ops directly (window CSR built here), so they pin the native contract of
csrc/lightkv.cpp independently of the public API's plumbing; a few run the public API on CPU.
The test past int32 offsets needs ~9 GB and runs only with LIGHTKV_BIG_TESTS=1.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightkv_ext
from lightkv_ext import reference

from inputs import make_inputs

score_op = torch.ops.lightkv.score
merge_op = torch.ops.lightkv.merge
compress_op = torch.ops.lightkv.compress

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VALUE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
SCORE_TOL = dict(atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- helpers
def merge_count(n, ratio):
    return min(math.floor(ratio * n + 1e-6), n // 2)


def band(coord, extent, parts):
    """Band of each coordinate: extent // parts cells per band, the first extent % parts one more."""
    small, n_large = divmod(extent, parts)
    edge = n_large * (small + 1)
    return torch.where(coord < edge, coord // (small + 1), n_large + (coord - edge) // max(small, 1))


def window_csr(positions, grid, windows, ratio):
    """(window_tokens, window_offsets, kept per row, largest window) of dense rows, as lightkv::merge
    takes them."""
    B, N = positions.shape
    (h, w), (ph, pw) = grid, windows
    labels = band(positions // w, h, ph) * pw + band(positions % w, w, pw)
    flat = (labels + ph * pw * torch.arange(B)[:, None]).reshape(-1)
    tokens = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=B * ph * pw)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    per_row = counts.reshape(B, ph * pw).tolist()
    kept = [sum(n - merge_count(n, ratio) for n in row) for row in per_row]
    return tokens, offsets, kept, int(counts.max())


def pair(windows):
    return (windows, windows) if isinstance(windows, int) else tuple(windows)


def dense_images(B, N, T):
    return torch.tensor([[b, 0, N, 0, T] for b in range(B)], dtype=torch.long).reshape(B, 5)


def native_compress(k, v, text, *, ratio=0.5, windows=1, grid=None, text_mask=None, scale=None,
                    importance=None, metric=None, sizes=None, positions=None, token_major=False):
    """compress() of SPEC built from the two native ops (dense rows)."""
    B, H, N, D = k.shape
    T = text.shape[2]
    grid = grid or (math.isqrt(N), math.isqrt(N))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if importance is None:
        importance = score_op(k, text, dense_images(B, N, T), text_mask, sizes, scale)
    metric4 = k.permute(0, 2, 1, 3) if metric is None else metric.unsqueeze(2)
    sizes = torch.ones(B, N, dtype=torch.int32) if sizes is None else sizes
    positions = torch.arange(N).expand(B, N) if positions is None else positions
    tokens, offsets, kept, max_window = window_csr(positions, grid, pair(windows), ratio)
    assert len(set(kept)) == 1
    k_out, v_out, sizes_out, index, assignment = merge_op(
        k, v, metric4, importance, sizes, tokens, offsets, ratio, kept[0], max_window, token_major)
    return dict(k=k_out, v=v_out, sizes=sizes_out, index=index, assignment=assignment,
                importance=importance)


def reference_compress(k, v, text, **kwargs):
    out = reference.compress(k, v, text, **kwargs)
    return dict(k=out.k, v=out.v, sizes=out.sizes, index=out.index, assignment=out.assignment,
                importance=out.importance)


def assert_same_result(native, expected, dtype):
    for name in ("index", "assignment", "sizes"):
        assert native[name].dtype == expected[name].dtype, name
        assert torch.equal(native[name], expected[name]), name
    torch.testing.assert_close(native["importance"], expected["importance"], **SCORE_TOL)
    for name in ("k", "v"):
        assert native[name].dtype == dtype
        torch.testing.assert_close(native[name], expected[name], **VALUE_TOL[dtype])


def bits(x):
    """A view of x's bits, so that equality is bitwise (tells -0.0 from 0.0, NaN from NaN)."""
    return x.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def assert_bitwise_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


# ----------------------------------------------------------------------------- score
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_sizes", [False, True])
def test_score_matches_reference(dtype, masked, with_sizes):
    k, _, text = make_inputs(B=3, H_kv=2, group=3, N=13, T=6, D=12, dtype=dtype)
    text_mask = None
    if masked:
        text_mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    sizes = torch.randint(1, 5, (3, 13), dtype=torch.int32) if with_sizes else None
    native = score_op(k, text, dense_images(3, 13, 6), text_mask, sizes, 0.3)
    expected = reference.score(k, text, text_mask=text_mask, scale=0.3, sizes=sizes)
    assert native.dtype == torch.float32 and native.shape == (3, 13)
    torch.testing.assert_close(native, expected, **SCORE_TOL)
    torch.testing.assert_close(native.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    if masked:  # no counted text token in row 1: uniform
        assert torch.equal(native[1], torch.full((13,), 1.0 / 13))


def test_score_segmented_layout_matches_per_image_reference():
    """Several images (and text ranges) packed in one row, as compress_varlen passes them."""
    H_kv, H_q, D = 2, 4, 8
    gen = torch.Generator().manual_seed(1)
    vis_lens, text_lens = [6, 9, 4], [3, 0, 5]
    gap = 2  # tokens outside every image get importance 0
    total_n = sum(vis_lens) + gap
    packed_k = torch.randn(total_n, H_kv, D, generator=gen)
    packed_text = torch.randn(sum(text_lens), H_q, D, generator=gen)
    text_mask = torch.ones(1, sum(text_lens), dtype=torch.bool)
    text_mask[0, -1] = False
    rows, vis_start, text_start = [], gap, 0
    for n, t in zip(vis_lens, text_lens):
        rows.append([0, vis_start, n, text_start, t])
        vis_start += n
        text_start += t
    k4 = packed_k.permute(1, 0, 2).unsqueeze(0)
    text4 = packed_text.permute(1, 0, 2).unsqueeze(0)
    native = score_op(k4, text4, torch.tensor(rows), text_mask, None, 0.5)
    assert torch.equal(native[0, :gap], torch.zeros(gap))
    for batch_row, vs, n, ts, t in rows:
        image_k = k4[:, :, vs:vs + n]
        if t == 0:
            expected = torch.full((1, n), 1.0 / n)
        else:
            expected = reference.score(image_k, text4[:, :, ts:ts + t], text_mask=text_mask[:, ts:ts + t], scale=0.5)
        torch.testing.assert_close(native[:, vs:vs + n], expected, **SCORE_TOL)


# ----------------------------------------------------------------------------- merge vs reference
CASES = {
    "square_2x2_windows": dict(grid=(4, 4), windows=2, ratio=0.5),
    "non_square_grid": dict(grid=(4, 6), windows=(2, 3), ratio=0.5),
    "uneven_windows": dict(grid=(5, 7), windows=(2, 3), ratio=0.3),
    "windows_of_1_or_2_tokens": dict(grid=(4, 5), windows=(4, 3), ratio=0.5),
    "single_token": dict(grid=(1, 1), windows=1, ratio=0.5),
    "two_tokens": dict(grid=(1, 2), windows=1, ratio=0.9),
    "one_window_high_ratio": dict(grid=(3, 5), windows=1, ratio=0.75),
    "masked_text": dict(grid=(4, 4), windows=1, ratio=0.5, masked=True),
    "metric_float64": dict(grid=(3, 4), windows=(1, 2), ratio=0.5, metric=torch.float64),
    "metric_float16": dict(grid=(3, 4), windows=1, ratio=0.5, metric=torch.float16),
    "sizes_and_scale": dict(grid=(4, 4), windows=2, ratio=0.5, sizes=True, scale=0.7),
}


def case_inputs(case, dtype):
    h, w = case["grid"]
    N = h * w
    k, v, text = make_inputs(B=2, H_kv=2, group=2, N=N, T=4, D=8, dtype=dtype, seed=N)
    kwargs = dict(ratio=case["ratio"], windows=case["windows"], grid=case["grid"])
    if case.get("masked"):
        kwargs["text_mask"] = torch.tensor([[True, False, True, False], [False] * 4])
    if "metric" in case:
        kwargs["metric"] = torch.randn(2, N, 6, generator=torch.Generator().manual_seed(7)).to(case["metric"])
    if case.get("sizes"):
        kwargs["sizes"] = torch.randint(1, 4, (2, N), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    if "scale" in case:
        kwargs["scale"] = case["scale"]
    return k, v, text, kwargs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_compress_matches_reference(case, dtype):
    k, v, text, kwargs = case_inputs(CASES[case], dtype)
    native = native_compress(k, v, text, **kwargs)
    assert_same_result(native, reference_compress(k, v, text, **kwargs), dtype)
    N = k.shape[2]
    expected_sizes = kwargs["sizes"].sum(-1) if "sizes" in kwargs else torch.full((2,), N)
    assert torch.equal(native["sizes"].sum(-1).long(), expected_sizes.long())
    assert torch.equal(native["assignment"].gather(1, native["index"]),
                       torch.arange(native["index"].shape[1]).expand_as(native["index"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_with_given_importance_matches_reference(dtype):
    k, v, text = make_inputs(B=2, N=30, dtype=dtype, seed=5)
    importance = torch.rand(2, 30, generator=torch.Generator().manual_seed(2))
    importance[0, :10] = 0  # groups of total weight 0 get equal weights
    kwargs = dict(ratio=0.5, windows=(2, 2), grid=(5, 6), importance=importance)
    native = native_compress(k, v, text, **kwargs)
    assert_same_result(native, reference_compress(k, v, text, **kwargs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("windows", [(1, 1), (2, 2), (3, 2)])
def test_second_stage_with_positions_matches_reference(dtype, windows):
    grid = (6, 8)
    k, v, text = make_inputs(B=2, N=48, dtype=dtype, seed=11)
    first = reference.compress(k, v, text, ratio=0.5, windows=(3, 4), grid=grid)
    positions = first.index  # the anchors' cells on the original grid
    kwargs = dict(ratio=0.5, windows=windows, grid=grid, sizes=first.sizes, positions=positions)
    native = native_compress(first.k, first.v, text, **kwargs)
    expected = reference_compress(first.k, first.v, text, **kwargs)
    assert_same_result(native, expected, dtype)
    assert torch.equal(native["sizes"].sum(-1), torch.full((2,), 48, dtype=torch.int32))


def test_packed_merge_matches_per_image_reference():
    """Images of different grids packed in one row (B = 1, L = total_N) as compress_varlen does."""
    H, D, ratio = 2, 8, 0.5
    gen = torch.Generator().manual_seed(4)
    grids, windows = [(3, 4), (5, 5), (2, 3)], [(1, 2), (2, 2), (1, 1)]
    lens = [h * w for h, w in grids]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    packed_k = torch.randn(sum(lens), H, D, generator=gen)
    packed_v = torch.randn(sum(lens), H, D, generator=gen)
    importance = torch.rand(1, sum(lens), generator=gen)
    all_tokens, all_offsets, kept_total, max_window = [], [torch.zeros(1, dtype=torch.long)], 0, 0
    for start, n, grid, win in zip(starts, lens, grids, windows):
        tokens, offsets, kept, largest = window_csr(torch.arange(n)[None], grid, win, ratio)
        all_tokens.append(tokens + start)
        all_offsets.append(offsets[1:] + all_offsets[-1][-1])
        kept_total += kept[0]
        max_window = max(max_window, largest)
    k4, v4 = packed_k.permute(1, 0, 2).unsqueeze(0), packed_v.permute(1, 0, 2).unsqueeze(0)
    k_out, v_out, sizes, index, assignment = merge_op(
        k4, v4, packed_k.unsqueeze(0), importance, torch.ones(1, sum(lens), dtype=torch.int32),
        torch.cat(all_tokens), torch.cat(all_offsets), ratio, kept_total, max_window, True)
    # token_major: (B, M, H, D) storage seen as (B, H, M, D)
    assert k_out.shape == (1, H, kept_total, D) and k_out.permute(0, 2, 1, 3).is_contiguous()
    slot = 0
    for start, n, grid, win in zip(starts, lens, grids, windows):
        image = slice(start, start + n)
        expected = reference.compress(k4[:, :, image], v4[:, :, image], torch.randn(1, H, 1, D), ratio=ratio,
                                      windows=win, grid=grid, importance=importance[:, image])
        m = expected.index.shape[1]
        assert torch.equal(index[:, slot:slot + m] - start, expected.index)
        assert torch.equal(assignment[:, image] - slot, expected.assignment)
        assert torch.equal(sizes[:, slot:slot + m], expected.sizes)
        torch.testing.assert_close(k_out[:, :, slot:slot + m], expected.k, **VALUE_TOL[torch.float32])
        torch.testing.assert_close(v_out[:, :, slot:slot + m], expected.v, **VALUE_TOL[torch.float32])
        slot += m
    assert slot == kept_total


# ----------------------------------------------------------------------------- public API on CPU
def as_dict(out):
    return {name: getattr(out, name) for name in ("k", "v", "sizes", "index", "assignment", "importance")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_public_compress_matches_reference(case, dtype):
    k, v, text, kwargs = case_inputs(CASES[case], dtype)
    native = as_dict(lightkv_ext.compress(k, v, text, **kwargs))
    assert_same_result(native, reference_compress(k, v, text, **kwargs), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_compress_varlen_equals_per_image_compress(dtype):
    H_kv, H_q, D = 2, 4, 8
    gen = torch.Generator().manual_seed(8)
    grids = [(4, 6), (5, 5), (2, 2), (3, 2)]
    lens = [h * w for h, w in grids]
    cu = torch.tensor([0] + lens).cumsum(0)
    k = torch.randn(cu[-1], H_kv, D, generator=gen).to(dtype)
    v = torch.randn(cu[-1], H_kv, D, generator=gen).to(dtype)
    text = torch.randn(9, H_q, D, generator=gen).to(dtype)
    cu_text = torch.tensor([0, 3, 3, 5, 9])  # image 1 has no text: uniform importance
    out = lightkv_ext.compress_varlen(k, v, text, cu, grids, cu_seqlens_text=cu_text, ratio=0.5, windows=2)
    for i, grid in enumerate(grids):
        tokens, texts = slice(cu[i], cu[i + 1]), slice(cu_text[i], cu_text[i + 1])
        image_text = text[texts].permute(1, 0, 2)[None]
        text_mask = None
        if image_text.shape[2] == 0:  # the dense API needs a text tensor: mask out a dummy token
            image_text, text_mask = text[:1].permute(1, 0, 2)[None], torch.zeros(1, 1, dtype=torch.bool)
        expected = reference.compress(k[tokens].permute(1, 0, 2)[None], v[tokens].permute(1, 0, 2)[None],
                                      image_text, ratio=0.5, windows=2, grid=grid, text_mask=text_mask)
        slots = slice(out.cu_seqlens[i], out.cu_seqlens[i + 1])
        native = dict(k=out.k[slots].permute(1, 0, 2)[None], v=out.v[slots].permute(1, 0, 2)[None],
                      sizes=out.sizes[slots][None], index=out.index[slots][None],
                      assignment=out.assignment[tokens][None], importance=out.importance[tokens][None])
        assert_same_result(native, as_dict(expected), dtype)


# ----------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_zero_is_identity(dtype):
    k, v, text = make_inputs(N=20, dtype=dtype)
    sizes = torch.randint(1, 3, (2, 20), dtype=torch.int32)
    out = native_compress(k, v, text, ratio=0.0, windows=(2, 2), grid=(4, 5), sizes=sizes)
    assert_bitwise_equal(out["k"], k)
    assert_bitwise_equal(out["v"], v)
    assert torch.equal(out["index"], torch.arange(20).expand(2, 20))
    assert torch.equal(out["assignment"], torch.arange(20).expand(2, 20))
    assert torch.equal(out["sizes"], sizes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tokens_without_merged_srcs_are_copied_bitwise(dtype):
    k, v, text = make_inputs(N=36, dtype=dtype)
    # A singleton computed as (w * x) / w would flush subnormals (the weights are about 1 / N) and
    # could lose -0.0: plant both among the normal values.
    k = k.clone()
    k.view(-1)[::7] = -0.0
    k.view(-1)[::11] = torch.finfo(dtype).smallest_normal / 4
    out = native_compress(k, v, text, ratio=0.3, windows=2, grid=(6, 6))
    alone = out["sizes"] == 1
    assert alone.any() and (~alone).any()
    for name, x in (("k", k), ("v", v)):
        anchors = x.gather(2, out["index"][:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))
        mask = alone[:, None, :, None].expand_as(anchors)
        assert torch.equal(bits(out[name])[mask], bits(anchors)[mask])


def test_zero_weight_group_uses_equal_weights():
    k = torch.tensor([1.0, 2.0, 10.0, 20.0]).reshape(1, 1, 4, 1)
    v = -k
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]).reshape(1, 4, 1, 2)
    importance = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    tokens, offsets = torch.arange(4), torch.tensor([0, 2, 4])
    k_out, v_out, sizes, index, assignment = merge_op(
        k, v, metric, importance, torch.ones(1, 4, dtype=torch.int32), tokens, offsets, 0.5, 2, 2, False)
    assert torch.equal(index, torch.tensor([[1, 3]]))
    assert torch.equal(assignment, torch.tensor([[0, 0, 1, 1]]))
    assert torch.equal(sizes, torch.tensor([[2, 2]], dtype=torch.int32))
    assert torch.equal(k_out.flatten(), torch.tensor([1.5, 17.5]))
    assert torch.equal(v_out.flatten(), torch.tensor([-1.5, -17.5]))


def test_ties_go_to_lowest_dst_and_lowest_src():
    # One window of 5 identical metric vectors: every similarity ties.
    k = torch.arange(5.0).reshape(1, 1, 5, 1)
    metric = torch.ones(1, 5, 1, 3)
    tokens, offsets = torch.arange(5), torch.tensor([0, 5])
    _, _, sizes, index, assignment = merge_op(
        k, k, metric, torch.ones(1, 5), torch.ones(1, 5, dtype=torch.int32), tokens, offsets, 0.4, 3, 5, False)
    # srcs 0, 2, 4 all pick dst 1; r = 2 merges srcs 0 and 2 (the lower positions).
    assert torch.equal(index, torch.tensor([[1, 3, 4]]))
    assert torch.equal(assignment, torch.tensor([[0, 0, 0, 1, 2]]))
    assert torch.equal(sizes, torch.tensor([[3, 1, 1]], dtype=torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_copied_keys_tie_like_the_reference_in_large_windows(dtype):
    # Every third key a copy of the first, in windows of 70 and 77 tokens: exact ties all over,
    # where a matrix product rounds the copies' dot products by position (SPEC's ties need them equal).
    k, v, text = make_inputs(B=2, H_kv=2, group=1, N=7 * 21, T=5, D=64, dtype=dtype, seed=3)
    k[:, :, 1::3] = k[:, :, :1]
    kwargs = dict(ratio=0.5, windows=(1, 2), grid=(7, 21))
    assert_same_result(native_compress(k, v, text, **kwargs), reference_compress(k, v, text, **kwargs), dtype)


def big_case(dtype):
    k, v, text = make_inputs(B=2, H_kv=4, group=2, N=24 * 20, T=16, D=32, dtype=dtype, seed=9)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) > 0.3
    return k, v, text, dict(ratio=0.5, windows=(3, 2), grid=(24, 20), text_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    k, v, text, kwargs = big_case(dtype)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = native_compress(k, v, text, **kwargs)
        runs = []
        for threads in (2, 2, 3):  # 3 threads split the work unevenly
            torch.set_num_threads(threads)
            runs.append(native_compress(k, v, text, **kwargs))
    finally:
        torch.set_num_threads(previous)
    for other in runs:
        for name in single:
            assert_bitwise_equal(single[name], other[name])


def test_inputs_are_not_modified():
    k, v, text, kwargs = big_case(torch.bfloat16)
    metric = torch.randn(2, k.shape[2], 5)
    sizes = torch.randint(1, 4, (2, k.shape[2]), dtype=torch.int32)
    importance = torch.rand(2, k.shape[2])
    inputs = [k, v, text, metric, sizes, importance, kwargs["text_mask"]]
    before = [x.clone() for x in inputs]
    native_compress(k, v, text, metric=metric, sizes=sizes, **kwargs)
    native_compress(k, v, text, importance=importance, **kwargs)
    for x, y in zip(inputs, before):
        assert_bitwise_equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_bitwise_same_result(dtype):
    k, v, text, kwargs = big_case(dtype)
    B, H, N, D = k.shape
    metric = torch.randn(B, N, 6)
    sizes = torch.randint(1, 4, (B, N), dtype=torch.int32)
    contiguous = native_compress(k, v, text, metric=metric, sizes=sizes, **kwargs)

    def strided(x, perm):  # same values, other memory layout
        inverse = [perm.index(i) for i in range(len(perm))]
        return x.permute(perm).contiguous().permute(inverse)

    padded_metric = torch.zeros(B, N, 12)
    padded_metric[..., ::2] = metric
    text_mask = kwargs.pop("text_mask")
    other = native_compress(strided(k, [2, 0, 3, 1]), strided(v, [3, 1, 2, 0]), strided(text, [2, 3, 1, 0]),
                            metric=padded_metric[..., ::2], sizes=strided(sizes, [1, 0]),
                            text_mask=strided(text_mask, [1, 0]), **kwargs)
    for name in contiguous:
        assert_bitwise_equal(contiguous[name], other[name])
    importance = torch.rand(B, N)
    given = native_compress(k, v, text, importance=importance, **kwargs)
    given_strided = native_compress(k, v, text, importance=strided(importance, [1, 0]), **kwargs)
    for name in given:
        assert_bitwise_equal(given[name], given_strided[name])


def test_token_major_output_layout():
    k, v, text, kwargs = big_case(torch.float16)
    plain = native_compress(k, v, text, **kwargs)
    major = native_compress(k, v, text, token_major=True, **kwargs)
    B, H, M, D = plain["k"].shape
    for name in ("k", "v"):
        assert plain[name].is_contiguous()
        assert major[name].shape == (B, H, M, D)
        assert major[name].stride() == (M * H * D, D, H * D, 1)
        assert_bitwise_equal(plain[name], major[name])


# ----------------------------------------------------------------------------- past int32 offsets
BIG = pytest.mark.skipif(os.environ.get("LIGHTKV_BIG_TESTS") != "1",
                         reason="needs ~9 GB of memory; set LIGHTKV_BIG_TESTS=1")


def big_keys():
    """(1, 128, N, 512) bfloat16 with more than 2**31 elements; key l of head h is (l % 97 + h % 5)."""
    H, N, D = 128, 2**15 + 64, 512
    assert H * N * D > 2**31
    k = torch.empty(1, H, N, D, dtype=torch.bfloat16)
    pattern = (torch.arange(N) % 97)[None, :, None] + (torch.arange(H) % 5)[:, None, None]
    k[0].copy_(pattern.expand(H, N, D))
    return k


@pytest.mark.slow
@BIG
def test_ops_index_past_int32():
    k = big_keys()
    _, H, N, D = k.shape
    # score: one query per head; its logits favour large keys, so the last tokens (at offsets past
    # 2**31 in the last heads) weigh most. Expected value from the closed form in float64.
    text = torch.full((1, H, 1, D), 1.0 / D, dtype=torch.bfloat16)
    importance = score_op(k, text, dense_images(1, N, 1), None, None, 1.0)
    values = (torch.arange(N) % 97).double()[None, :] + (torch.arange(H) % 5).double()[:, None]
    expected = torch.softmax(values, dim=-1).mean(0)[None].float()
    torch.testing.assert_close(importance, expected, atol=1e-9, rtol=1e-4)

    # merge: windows of two tokens, so every output token is the mean of tokens 2m and 2m + 1.
    tokens, offsets = torch.arange(N), torch.arange(0, N + 1, 2)
    k_out, v_out, sizes, index, assignment = merge_op(
        k, k, torch.zeros(1, N, 1, 1), torch.ones(1, N), torch.ones(1, N, dtype=torch.int32),
        tokens, offsets, 0.5, N // 2, 2, False)
    assert torch.equal(index[0], torch.arange(1, N, 2))
    assert torch.equal(assignment[0], torch.arange(N) // 2)
    last_heads = slice(H - 3, H)
    pairs = k[0, last_heads].float().reshape(3, N // 2, 2, D).mean(2).to(torch.bfloat16)
    assert torch.equal(k_out[0, last_heads], pairs)
    assert torch.equal(v_out[0, last_heads], pairs)


# ----------------------------------------------------------------------------- bad input
def small_merge_args(**overrides):
    k, v, _ = make_inputs(B=1, N=4)
    args = dict(k=k, v=v, metric=k.permute(0, 2, 1, 3), importance=torch.ones(1, 4),
                sizes=torch.ones(1, 4, dtype=torch.int32), window_tokens=torch.arange(4),
                window_offsets=torch.tensor([0, 4]), ratio=0.5, kept=2, max_window=4, token_major=False)
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize("overrides, message", [
    (dict(window_tokens=torch.tensor([0, 1, 1, 3])), "more than once"),
    (dict(window_tokens=torch.tensor([0, 1, 2, 7])), "outside"),
    (dict(window_tokens=torch.tensor([1, 0, 2, 3])), "increasing"),
    (dict(window_offsets=torch.tensor([0, 3])), "window_offsets"),
    (dict(window_offsets=torch.tensor([0, 3, 2, 4])), "non-decreasing"),
    (dict(kept=3), "keeps 2 tokens, expected kept = 3"),
    (dict(kept=5), "kept must be in"),
    (dict(max_window=3), "window 0 has 4 tokens, more than max_window = 3"),
    (dict(max_window=-1), "max_window must be >= 0"),
    (dict(ratio=1.0), "ratio"),
    (dict(importance=torch.tensor([[1.0, -1.0, 1.0, 1.0]])), "importance"),
    (dict(importance=torch.tensor([[1.0, float("nan"), 1.0, 1.0]])), "importance"),
    (dict(importance=torch.ones(1, 4, dtype=torch.float64)), "importance must be Float"),
    (dict(sizes=torch.zeros(1, 4, dtype=torch.int32)), "sizes must be >= 1"),
    (dict(sizes=torch.ones(1, 4, dtype=torch.int64)), "sizes must be Int"),
    (dict(k=torch.ones(1, 2, 4, 8, dtype=torch.int32)), "k must be float32"),
    (dict(v=torch.ones(1, 2, 3, 8)), "v must have shape"),
    (dict(metric=torch.ones(1, 5, 1, 8)), "metric must be 4-D"),
    (dict(metric=torch.full((1, 4, 1, 2), float("inf"))), "metric must be finite"),
])
def test_merge_rejects_bad_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        merge_op(*small_merge_args(**overrides))


def test_merge_rejects_window_spanning_rows():
    k, v, _ = make_inputs(B=2, N=2)
    tokens, offsets = torch.tensor([0, 2, 1, 3]), torch.tensor([0, 2, 4])
    with pytest.raises(RuntimeError, match="mixes batch rows"):
        merge_op(k, v, k.permute(0, 2, 1, 3), torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int32),
                 tokens, offsets, 0.5, 1, 2, False)


@pytest.mark.parametrize("images, message", [
    ([[0, 0, 4, 0, 2], [0, 3, 1, 0, 2]], "overlap"),
    ([[1, 0, 4, 0, 2]], "batch_row"),
    ([[0, 2, 4, 0, 2]], "vision tokens"),
    ([[0, 0, 4, 1, 2]], "text tokens"),
])
def test_score_rejects_bad_images(images, message):
    k, _, text = make_inputs(B=1, N=4, T=2)
    with pytest.raises(RuntimeError, match=message):
        score_op(k, text, torch.tensor(images), None, None, 1.0)


def test_score_rejects_bad_arguments():
    k, _, text = make_inputs(B=1, H_kv=2, group=1, N=4, T=2)
    images = dense_images(1, 4, 2)
    with pytest.raises(RuntimeError, match="multiple of k heads"):
        score_op(k, text[:, :1].expand(1, 3, 2, 8), images, None, None, 1.0)
    with pytest.raises(RuntimeError, match="text must be Half"):
        score_op(k.half(), text, images, None, None, 1.0)
    with pytest.raises(RuntimeError, match="text_mask must be Bool"):
        score_op(k, text, images, torch.ones(1, 2), None, 1.0)
    with pytest.raises(RuntimeError, match="sizes must be >= 1"):
        score_op(k, text, images, None, torch.zeros(1, 4, dtype=torch.int32), 1.0)


def test_score_checks_its_text_rows_bound():
    """text_rows bounds the images' total text_len (the CUDA op sizes its softmax statistics by it,
    unchecked): the CPU op takes that sum or more, as if not given, and names the argument below it."""
    k, _, text = make_inputs(B=2, N=6, T=3)
    images = torch.tensor([[0, 0, 6, 0, 3], [1, 0, 4, 1, 2], [1, 4, 2, 0, 0]])  # 5 text rows
    unbounded = score_op(k, text, images, None, None, 0.5)
    for text_rows in (5, 6, 100):
        assert torch.equal(score_op(k, text, images, None, None, 0.5, text_rows), unbounded)
    with pytest.raises(RuntimeError, match=r"text_rows \(4\) must be at least the images' total text_len \(5\)"):
        score_op(k, text, images, None, None, 0.5, 4)
    with pytest.raises(RuntimeError, match="text_rows must be >= 0, or -1"):
        score_op(k, text, images, None, None, 0.5, -2)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck():
    ops = pytest.importorskip("lightkv_ext.ops", reason="fake kernels (lightkv_ext/ops.py) not written yet")
    del ops
    k, v, text = make_inputs(B=2, N=12, T=3)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    sizes = torch.randint(1, 3, (2, 12), dtype=torch.int32)
    torch.library.opcheck(score_op.default, (k, text, dense_images(2, 12, 3), mask, sizes, 0.5))
    torch.library.opcheck(score_op.default, (k, text, dense_images(2, 12, 3), mask, sizes, 0.5, 6))
    tokens, offsets, kept, max_window = window_csr(torch.arange(12).expand(2, 12), (3, 4), (1, 2), 0.5)
    for token_major in (False, True):
        torch.library.opcheck(merge_op.default, (k, v, k.permute(0, 2, 1, 3), torch.rand(2, 12), sizes,
                                                 tokens, offsets, 0.5, kept[0], max_window, token_major))
        torch.library.opcheck(compress_op.default, (k, v, text, dense_images(2, 12, 3), mask, sizes, 0.5,
                                                    k.permute(0, 2, 1, 3), tokens, offsets, 0.5, kept[0],
                                                    max_window, token_major, 6))
    bases = torch.zeros(2, 2, 12, dtype=torch.int64)
    torch.library.opcheck(merge_op.default, (k, v, k.permute(0, 2, 1, 3), torch.rand(2, 12), sizes, tokens, offsets,
                                             0.5, kept[0], max_window, True, bases))
    torch.library.opcheck(compress_op.default, (k, v, text, dense_images(2, 12, 3), mask, sizes, 0.5,
                                                k.permute(0, 2, 1, 3), tokens, offsets, 0.5, kept[0], max_window,
                                                True, 6, bases))


def test_merge_local_bases_number_from_each_image():
    """local_bases (the packed API's): each index entry minus plane 0 at its kept token, each
    assignment minus plane 1 at its token; everything else as without them."""
    k, v, _ = make_inputs(B=2, N=12, T=3)
    sizes = torch.ones(2, 12, dtype=torch.int32)
    tokens, offsets, kept, max_window = window_csr(torch.arange(12).expand(2, 12), (3, 4), (1, 2), 0.5)
    args = (k, v, k.permute(0, 2, 1, 3), torch.rand(2, 12), sizes, tokens, offsets, 0.5, kept[0], max_window, False)
    bases = torch.randint(-5, 5, (2, 2, 12))
    plain, local = merge_op(*args), merge_op(*args, bases)
    for a, b in zip(plain[:3], local[:3]):
        assert torch.equal(a, b)
    assert torch.equal(local[3], plain[3] - bases[0].gather(1, plain[3]))
    assert torch.equal(local[4], plain[4] - bases[1])
    for bad, message in ((bases[:, :1], r"local_bases must have shape \[2, 2, 12\]"),
                         (bases.int(), "local_bases must be Long")):
        with pytest.raises(RuntimeError, match=message):
            merge_op(*args, bad)


@pytest.mark.parametrize("unit_sizes", [True, False], ids=["unit-sizes", "sizes"])
def test_compress_op_is_score_then_merge(unit_sizes):
    """lightkv::compress equals lightkv::score followed by lightkv::merge with its importance,
    bitwise; unit sizes bias the logits by log 1 = 0, exactly as no sizes."""
    k, v, text = make_inputs(B=2, N=30, T=4, dtype=torch.bfloat16)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    sizes = torch.ones(2, 30, dtype=torch.int32) if unit_sizes else torch.randint(1, 4, (2, 30), dtype=torch.int32)
    images = dense_images(2, 30, 4)
    tokens, offsets, kept, max_window = window_csr(torch.arange(30).expand(2, 30), (5, 6), (2, 2), 0.5)
    metric = k.permute(0, 2, 1, 3)
    *merged, importance = compress_op(k, v, text, images, mask, sizes, 0.25, metric, tokens, offsets, 0.5, kept[0],
                                      max_window, False)
    want_importance = score_op(k, text, images, mask, None if unit_sizes else sizes, 0.25)
    want = merge_op(k, v, metric, want_importance, sizes, tokens, offsets, 0.5, kept[0], max_window, False)
    assert torch.equal(importance, want_importance)
    for got, expected in zip(merged, want):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- property test
@st.composite
def compress_problems(draw):
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    windows = (draw(st.integers(1, h)), draw(st.integers(1, w)))
    B = draw(st.integers(1, 2))
    H_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    D, T = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    ratio = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.99]))
    seed = draw(st.integers(0, 2**31 - 1))
    masked = draw(st.booleans())
    return dict(grid=(h, w), windows=windows, B=B, H_kv=H_kv, group=group, D=D, T=T, dtype=dtype,
                ratio=ratio, seed=seed, masked=masked)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compress_problems())
def test_property_matches_reference(problem):
    h, w = problem["grid"]
    k, v, text = make_inputs(B=problem["B"], H_kv=problem["H_kv"], group=problem["group"], N=h * w,
                             T=problem["T"], D=problem["D"], dtype=problem["dtype"], seed=problem["seed"])
    kwargs = dict(ratio=problem["ratio"], windows=problem["windows"], grid=problem["grid"])
    if problem["masked"]:
        gen = torch.Generator().manual_seed(problem["seed"])
        kwargs["text_mask"] = torch.rand(problem["B"], problem["T"], generator=gen) > 0.5
    native = native_compress(k, v, text, **kwargs)
    assert_same_result(native, reference_compress(k, v, text, **kwargs), problem["dtype"])
    assert torch.equal(native["sizes"].sum(-1), torch.full((problem["B"],), h * w, dtype=torch.int32))
