"""The reference against SPEC on cases small enough to work out by hand, plus its invariants."""

import pytest
import torch

from lightkv_ext import reference

from inputs import make_inputs
from lightkv_ext.windows import band_of, merge_count, window_labels, window_sizes


def test_bands_put_the_extra_cells_in_the_first_bands():
    assert band_of(torch.arange(5), 5, 2).tolist() == [0, 0, 0, 1, 1]
    assert band_of(torch.arange(7), 7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert band_of(torch.arange(4), 4, 4).tolist() == [0, 1, 2, 3]


def test_window_labels_are_row_band_times_pw_plus_column_band():
    labels = window_labels(torch.arange(15), (3, 5), (2, 2)).reshape(3, 5)
    assert labels.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [2, 2, 2, 3, 3]]
    assert window_sizes((3, 5), (2, 2)) == [6, 4, 3, 2]


@pytest.mark.parametrize("ratio, n, expected", [(0.5, 9, 4), (0.5, 1, 0), (0.3, 10, 3), (0.7, 10, 5),
                                                (0.999, 3, 1), (0.0, 100, 0), (0.25, 4, 1)])
def test_merge_count(ratio, n, expected):
    assert merge_count(n, ratio) == expected


def _line(metric, importance, ratio, values=None):
    """Compress one row of tokens on a (1, n) grid with the given metric and importance."""
    n = metric.shape[0]
    x = values if values is not None else torch.arange(n * 2, dtype=torch.float32).reshape(1, 1, n, 2)
    return reference.compress(x, x.clone(), torch.ones(1, 1, 1, 2), ratio=ratio, grid=(1, n),
                              importance=importance[None], metric=metric[None])


def test_best_dst_ties_go_to_the_lowest_dst_and_merge_is_weighted():
    # src 0 is equally similar to dst 1 and dst 3 -> dst 1; src 2 is closest to dst 3.
    metric = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0], [1.0, -1.0]])
    importance = torch.tensor([1.0, 3.0, 2.0, 2.0])
    out = _line(metric, importance, ratio=0.5)
    assert out.index.tolist() == [[1, 3]]
    assert out.assignment.tolist() == [[0, 0, 1, 1]]
    assert out.sizes.tolist() == [[2, 2]]
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    expected = torch.stack([(1 * x[0] + 3 * x[1]) / 4, (2 * x[2] + 2 * x[3]) / 4])
    torch.testing.assert_close(out.k[0, 0], expected)


def test_src_rank_ties_go_to_the_lower_src():
    # Both srcs are identical to their dst, r = 1: src 0 wins the tie.
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = _line(metric, torch.ones(4), ratio=0.25)
    assert out.index.tolist() == [[1, 2, 3]]
    assert out.assignment.tolist() == [[0, 0, 1, 2]]


@pytest.mark.parametrize("n, width, every", [(20, 8, 2), (37, 40, 3), (70, 128, 3), (77, 256, 2), (301, 1000, 5)])
def test_equal_vectors_tie_exactly_wherever_they_are(n, width, every):
    # Copies of token 0's random vector at positions 1, 1 + every, ...: every src copy's best dst is
    # the first dst copy, and the src copies tie on that score, so r = copies - 1 leaves the last
    # one. A matrix product alone rounds the copies' dot products differently by position (these
    # shapes did on MKL), which broke both ties.
    metric = torch.randn(2, n, width, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    metric[:, 1::every] = metric[:, :1]
    copies = [0] + list(range(1, n, every))
    src_copies = [i for i in copies if i % 2 == 0]
    first_dst = min(i for i in copies if i % 2 == 1)
    x = torch.zeros(2, 1, n, 1)
    out = reference.compress(x, x, torch.ones(2, 1, 1, 1), ratio=(len(src_copies) - 1) / n, grid=(1, n),
                             importance=torch.ones(2, n), metric=metric)
    for row in out.assignment:
        assert [int(row[i]) for i in src_copies[:-1]] == [int(row[first_dst])] * (len(src_copies) - 1)
        assert int(row[src_copies[-1]]) != int(row[first_dst])


def test_equal_keys_alone_do_not_make_vectors_equal():
    # Keys that all collide (random weights make that all but impossible): a vector takes the
    # position of the first one with its key only when the two are equal.
    x, y, z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    rows = torch.stack([x, y, x, y, z])[None]
    first = reference._first_equal(rows, torch.arange(5)[None], torch.zeros(5, dtype=torch.float64))
    assert first.tolist() == [[0, 1, 0, 3, 4]]
    distinct_keys = torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert reference._first_equal(rows, torch.arange(5)[None], distinct_keys).tolist() == [[0, 1, 0, 1, 4]]


def test_highest_scoring_src_is_merged_first():
    metric = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = _line(metric, torch.ones(4), ratio=0.25)
    assert out.index.tolist() == [[0, 1, 3]]


def test_zero_weight_group_uses_equal_weights_and_lone_tokens_are_copied():
    metric = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = _line(metric, torch.tensor([0.0, 0.0, 5.0, 1.0]), ratio=0.25)
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    assert out.index.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(out.k[0, 0, 0], (x[0] + x[1]) / 2)
    assert torch.equal(out.k[0, 0, 1:], x[2:])


def test_score_matches_a_loop_over_heads_and_text_tokens():
    torch.manual_seed(0)
    B, H_kv, g, N, T, D = 2, 2, 3, 10, 4, 8
    k, q = torch.randn(B, H_kv, N, D), torch.randn(B, H_kv * g, T, D)
    mask = torch.tensor([[True, False, True, True], [False] * 4])
    sizes = torch.randint(1, 4, (B, N))
    got = reference.score(k, q, text_mask=mask, sizes=sizes, scale=0.3)
    for b in range(B):
        if not mask[b].any():
            torch.testing.assert_close(got[b], torch.full((N,), 1 / N))
            continue
        total = torch.zeros(N)
        for h in range(H_kv * g):
            for t in range(T):
                if mask[b, t]:
                    total += (0.3 * k[b, h // g] @ q[b, h, t] + sizes[b].float().log()).softmax(0)
        torch.testing.assert_close(got[b], total / (H_kv * g * int(mask[b].sum())))
    torch.testing.assert_close(got[0].sum(), torch.tensor(1.0))


def test_ratio_zero_is_the_identity():
    k, v, q = make_inputs(N=36)
    out = reference.compress(k, v, q, ratio=0.0, windows=3)
    assert torch.equal(out.k, k) and torch.equal(out.v, v)
    assert torch.equal(out.index, torch.arange(36).expand(2, 36))
    assert torch.equal(out.sizes, torch.ones(2, 36, dtype=torch.int32))


@pytest.mark.parametrize("grid, windows, ratio", [((6, 6), 1, 0.5), ((4, 9), (3, 2), 0.4), ((36, 1), (5, 1), 0.5)])
def test_invariants(grid, windows, ratio):
    k, v, q = make_inputs(N=36)
    before = [t.clone() for t in (k, v, q)]
    out = reference.compress(k, v, q, ratio=ratio, windows=windows, grid=grid)
    assert all(torch.equal(a, b) for a, b in zip(before, (k, v, q)))
    sizes = window_sizes(grid, windows if isinstance(windows, tuple) else (windows, windows))
    M = sum(n - merge_count(n, ratio) for n in sizes)
    assert out.k.shape == (2, 2, M, 8)
    assert out.sizes.sum(-1).tolist() == [36, 36]
    assert (out.index.diff(dim=1) > 0).all()
    assert torch.equal(out.assignment.gather(1, out.index), torch.arange(M).expand(2, M))
    assert torch.equal(torch.zeros(2, M, dtype=torch.long).scatter_add_(1, out.assignment, torch.ones(2, 36, dtype=torch.long)),
                       out.sizes.long())


def test_second_stage_windows_the_survivors_on_the_original_grid():
    k, v, q = make_inputs(N=64)
    first = reference.compress(k, v, q, ratio=0.5, windows=4)  # 16 windows of 4 tokens -> 2 kept each
    second = reference.compress(first.k, first.v, q, ratio=0.5, windows=2, grid=(8, 8),
                                positions=first.index, sizes=first.sizes)
    assert second.k.shape[2] == 16
    assert second.sizes.sum(-1).tolist() == [64, 64]
    # every second-stage group stays inside one 4x4 quadrant of the original grid
    cells = first.index
    quadrant = (cells // 8 // 4) * 2 + (cells % 8 // 4)
    for b in range(2):
        for m in range(16):
            assert quadrant[b][second.assignment[b] == m].unique().numel() == 1


def test_rows_with_different_kept_counts_are_rejected():
    k, v, q = make_inputs(B=2, N=4)
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 8]])
    with pytest.raises(ValueError, match="compress_varlen"):
        reference.compress(k, v, q, ratio=0.5, windows=(1, 2), grid=(3, 3), positions=positions)
