"""CUDA kernels against the PyTorch reference (skipped without a CUDA device).

Decisions (index, assignment, sizes) must be identical to the reference; values agree within
the dtype's tolerance; repeated runs are bitwise identical.
"""
import math
import random

import pytest
import torch

import lightkv_ext
from inputs import cancelling_keys
from lightkv_ext import api, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Values are float32 averages of the same inputs; the output rounding dominates.
VALUE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SCORE_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def _exact_float32_matmul():
    """The reference's einsum must not use TF32, or it is not an oracle for float32 inputs."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def make_inputs(B, H_kv, H_q, N, T, D, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(B, H_kv, N, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(B, H_kv, N, D, device="cuda", generator=gen).to(dtype)
    text = torch.randn(B, H_q, T, D, device="cuda", generator=gen).to(dtype)
    return k, v, text


def random_mask(B, T, seed, empty_row=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(B, T, device="cuda", generator=gen) < 0.7
    if empty_row is not None:
        mask[empty_row] = False
    return mask


def assert_same_compression(got, want, dtype):
    assert torch.equal(got.index, want.index)
    assert torch.equal(got.assignment, want.assignment)
    assert torch.equal(got.sizes, want.sizes)
    assert got.k.dtype == want.k.dtype == dtype and got.k.shape == want.k.shape
    torch.testing.assert_close(got.importance, want.importance, **SCORE_TOL)
    torch.testing.assert_close(got.k, want.k, **VALUE_TOL[dtype])
    torch.testing.assert_close(got.v, want.v, **VALUE_TOL[dtype])


def launched_kernels(call):
    """Names of the CUDA kernels one call launches (run once before, so that it launches nothing
    else: the cached window layout and workspace are built)."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        call()
        torch.cuda.synchronize()
    return [event.name for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]


def assert_bitwise_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        return
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)


# (B, H_kv, H_q, grid, T, D, windows, ratio)
SHAPES = [
    pytest.param(2, 2, 4, (6, 10), 7, 64, (2, 3), 0.5, id="non-square-grid-uneven-windows-gqa"),
    pytest.param(1, 1, 1, (1, 1), 1, 8, 1, 0.5, id="1x1-grid"),
    pytest.param(3, 2, 8, (24, 24), 40, 128, 4, 0.5, id="24x24-gqa4-B3"),
    pytest.param(2, 4, 4, (5, 7), 3, 72, (5, 7), 0.5, id="single-token-windows"),
    pytest.param(2, 1, 2, (9, 11), 5, 40, (2, 2), 0.3, id="ratio-0.3-odd-D"),
    pytest.param(1, 2, 2, (16, 16), 9, 256, 1, 0.9, id="D256-one-window"),
    pytest.param(1, 2, 4, (8, 8), 5, 320, 2, 0.5, id="D320"),
    # The longest rows one block groups, and one token row past it (the device-wide path).
    pytest.param(2, 1, 2, (64, 64), 4, 16, 8, 0.5, id="rows-of-4096"),
    pytest.param(2, 1, 2, (65, 64), 4, 16, 8, 0.5, id="rows-of-4160"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_sizes", [False, True])
# Up to 8 images the scoring kernels build the image tables, beyond image_offsets_kernel does.
@pytest.mark.parametrize("B", [3, 10], ids=["3-images", "10-images"])
# Both scorings forced (LIGHTKV_SCORE_PASSES), and the one the shape picks.
@pytest.mark.parametrize("passes", ["by-shape", "1", "2"])
def test_score_matches_reference(dtype, masked, with_sizes, B, passes, monkeypatch):
    if passes != "by-shape":
        monkeypatch.setenv("LIGHTKV_SCORE_PASSES", passes)
    H_kv, H_q, N, T, D = 2, 8, 150, 37, 64
    k, _, text = make_inputs(B, H_kv, H_q, N, T, D, dtype, seed=1)
    mask = random_mask(B, T, seed=2, empty_row=1) if masked else None
    sizes = torch.randint(1, 9, (B, N), device="cuda", dtype=torch.int32) if with_sizes else None
    got = lightkv_ext.score(k, text, text_mask=mask, sizes=sizes)
    want = reference.score(k, text, text_mask=mask, sizes=sizes)
    torch.testing.assert_close(got, want, **SCORE_TOL)
    torch.testing.assert_close(got.sum(-1), torch.ones(B, device="cuda"), rtol=1e-5, atol=1e-5)
    if masked:  # no counted text: uniform importance
        torch.testing.assert_close(got[1], torch.full((N,), 1.0 / N, device="cuda"))


# Rows of 576 and 1300 tokens: one_pass_kernel's clusters of 9 blocks of 1 column tile and of 11
# blocks of 2 (on a GPU that runs clusters, compute capability 9.0 on; elsewhere both calls take
# the two passes).
@pytest.mark.parametrize("N,H_kv,H_q", [(576, 32, 32), (1300, 4, 28)], ids=["llava15", "qwen25vl"])
def test_one_pass_matches_reference_and_repeats(N, H_kv, H_q, monkeypatch):
    monkeypatch.setenv("LIGHTKV_SCORE_PASSES", "1")
    k, _, text = make_inputs(2, H_kv, H_q, N, 64, 128, torch.bfloat16, seed=21)
    mask = random_mask(2, 64, seed=22)
    if torch.cuda.get_device_capability() >= (9, 0):  # the one pass ran, not its fallback
        kernels = launched_kernels(lambda: lightkv_ext.score(k, text, text_mask=mask))
        assert any("one_pass_kernel" in name for name in kernels), kernels
        assert not any("row_stats_kernel" in name for name in kernels), kernels
    got = lightkv_ext.score(k, text, text_mask=mask)
    assert_bitwise_equal(got, lightkv_ext.score(k, text, text_mask=mask))
    torch.testing.assert_close(got, reference.score(k, text, text_mask=mask), **SCORE_TOL)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, device="cuda"), rtol=1e-5, atol=1e-5)


# By default the one pass runs where its clusters are blocks of one column tile of a 16-bit type
# and fit one wave (LLaVA-1.5 at batch 1: 576 blocks); the two passes where blocks take two tiles
# (rows of 1300 tokens), the grid is larger (batch 2: 1152 blocks) or the type is float32.
@pytest.mark.parametrize("B,N,H_kv,H_q,dtype,one_pass", [
    (1, 576, 32, 32, torch.bfloat16, True), (1, 576, 32, 32, torch.float16, True),
    (2, 576, 32, 32, torch.bfloat16, False), (1, 1300, 4, 28, torch.bfloat16, False),
    (1, 576, 32, 32, torch.float32, False)])
def test_scoring_picked_by_shape(B, N, H_kv, H_q, dtype, one_pass, monkeypatch):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("one_pass_kernel runs in thread block clusters (compute capability 9.0 on)")
    monkeypatch.delenv("LIGHTKV_SCORE_PASSES", raising=False)
    k, _, text = make_inputs(B, H_kv, H_q, N, 64, 128, dtype, seed=25)
    kernels = launched_kernels(lambda: lightkv_ext.score(k, text))
    assert any("one_pass_kernel" in name for name in kernels) == one_pass, kernels
    assert any("row_stats_kernel" in name for name in kernels) == (not one_pass), kernels


@pytest.mark.parametrize("passes", ["1", "2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_score_keeps_subnormal_masses(dtype, passes, monkeypatch):
    """Tokens 95-102 nats below the best one get masses of 1e-41 to 6e-45 (float subnormals), as the
    reference does: the kernels' exponentials flush only below 2^-150 relative to a row's maximum."""
    monkeypatch.setenv("LIGHTKV_SCORE_PASSES", passes)
    D = 64
    k = torch.zeros(1, 1, 4, D, device="cuda")
    k[0, 0, 1:, 0] = -torch.tensor([95.0, 100.0, 102.0], device="cuda") * D ** 0.5
    text = torch.zeros(1, 1, 1, D, device="cuda")
    text[..., 0] = 1.0
    got = lightkv_ext.score(k.to(dtype), text.to(dtype))
    want = reference.score(k.to(dtype).cpu(), text.to(dtype).cpu()).cuda()
    assert (want[0, 1:] > 0).all() and (want[0, 1:] < 2.0 ** -126).all()
    torch.testing.assert_close(got, want, **SCORE_TOL)
    # A subnormal carries few bits (6e-45 is 4 x 2^-149): within 2^-149 of the reference's.
    assert (got[0, 1:] > 0).all(), got
    torch.testing.assert_close(got[0, 1:], want[0, 1:], rtol=0, atol=2.0 ** -149)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_rows_combined_between_passes(dtype):
    """17 row tiles in at most 16 row ranges, over 9 column ranges: row_finals_kernel combines each
    row's statistics once between the passes (as the 16k-token image's are)."""
    k, _, text = make_inputs(2, 1, 17, 520, 64, 32, dtype, seed=23)
    mask = random_mask(2, 64, seed=24)
    got = lightkv_ext.score(k, text, text_mask=mask)
    torch.testing.assert_close(got, reference.score(k, text, text_mask=mask), **SCORE_TOL)
    assert_bitwise_equal(lightkv_ext.score(k, text, text_mask=mask), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H_kv,H_q,grid,T,D,windows,ratio", SHAPES)
def test_compress_matches_reference(B, H_kv, H_q, grid, T, D, windows, ratio, dtype):
    N = grid[0] * grid[1]
    k, v, text = make_inputs(B, H_kv, H_q, N, T, D, dtype, seed=3)
    mask = random_mask(B, T, seed=4, empty_row=0 if B > 1 else None)
    kwargs = dict(ratio=ratio, windows=windows, grid=grid, text_mask=mask)
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), dtype)


@pytest.mark.parametrize("seed", range(32))
def test_random_shapes_match_reference(seed):
    """Shapes drawn at random (seeded, so a failure reproduces): grids up to 30 x 30 with uneven
    windows, GQA, head dims off the vector width, masks, given sizes, every dtype and ratio."""
    rng = random.Random(seed)
    h, w = rng.randint(1, 30), rng.randint(1, 30)
    windows = (rng.randint(1, min(h, 6)), rng.randint(1, min(w, 6)))
    B, H_kv, group, T = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 40)
    D, dtype = rng.choice([8, 24, 40, 64, 72, 128, 136, 256]), rng.choice(DTYPES)
    k, v, text = make_inputs(B, H_kv, H_kv * group, h * w, T, D, dtype, seed=seed)
    kwargs = dict(ratio=rng.choice([0.1, 0.25, 0.5, 0.75, 0.9]), windows=windows, grid=(h, w))
    if rng.random() < 0.5:
        kwargs["text_mask"] = random_mask(B, T, seed=seed)
    if rng.random() < 0.3:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        kwargs["sizes"] = torch.randint(1, 5, (B, h * w), device="cuda", generator=gen, dtype=torch.int32)
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs), reference.compress(k, v, text, **kwargs),
                            dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_stage_with_sizes_and_positions_matches_reference(dtype):
    B, grid = 1, (12, 18)  # rows of one dense call must keep equally many tokens
    k, v, text = make_inputs(B, 2, 4, grid[0] * grid[1], 11, 64, dtype, seed=5)
    first = lightkv_ext.compress(k, v, text, ratio=0.5, windows=4, grid=grid)
    kwargs = dict(ratio=0.5, windows=2, grid=grid, sizes=first.sizes, positions=first.index)
    got = lightkv_ext.compress(first.k, first.v, text, **kwargs)
    want = reference.compress(first.k, first.v, text, **kwargs)
    assert_same_compression(got, want, dtype)
    assert (got.sizes.sum(-1) == grid[0] * grid[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_given_importance_with_zero_weight_groups(dtype):
    k, v, text = make_inputs(2, 2, 2, 30, 4, 32, dtype, seed=6)
    importance = torch.rand(2, 30, device="cuda")
    importance[0, :12] = 0  # groups of total weight 0 use equal weights
    kwargs = dict(ratio=0.5, windows=(2, 2), grid=(5, 6), importance=importance)
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), dtype)


def test_ties_resolve_like_the_reference():
    """Duplicated tokens give exact similarity ties: lowest dst, then lowest src wins."""
    k, v, text = make_inputs(2, 2, 2, 64, 3, 16, torch.float32, seed=7)
    k[:, :, 8:16] = k[:, :, 0:1]  # eight identical keys
    k[:, :, 40:48] = k[:, :, 32:40]
    kwargs = dict(ratio=0.5, windows=(2, 2), grid=(8, 8))
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), torch.float32)


@pytest.fixture(params=["exact", "screened"])
def merge_mode(request, monkeypatch):
    """Each CUDA merge mode (csrc/cuda/merge.cu): the API passes the true largest window, which
    picks exact mode for the windows of these tests; a loose bound picks the screened mode."""
    if request.param == "screened":
        from lightkv_ext.windows import WindowLayout

        true_layout = api.full_grid_layout

        def loose_layout(*args, **kwargs):
            layout = true_layout(*args, **kwargs)  # cached: not modified
            return WindowLayout(layout.tokens, layout.offsets, layout.kept, 2**40)

        monkeypatch.setattr(api, "full_grid_layout", loose_layout)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_copied_keys_tie_like_the_reference_in_large_windows(dtype, merge_mode):
    """Every third key a copy of the first, in windows of 70 and 77 tokens: exact ties all over, which
    the reference keeps exact where its matrix product rounds the copies' dot products by position."""
    k, v, text = make_inputs(2, 2, 2, 7 * 21, 5, 64, dtype, seed=3)
    k[:, :, 1::3] = k[:, :, :1]
    kwargs = dict(ratio=0.5, windows=(1, 2), grid=(7, 21))
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), dtype)


# On a 12 x 12 grid: one window of 144 tokens (tiled exact mode) or four of 36 (one tile pair each).
WINDOWS_144_OR_36 = [pytest.param(1, id="144-token-windows"), pytest.param(2, id="36-token-windows")]


@pytest.mark.parametrize("windows", WINDOWS_144_OR_36)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_keys_take_the_exact_scan(dtype, windows, merge_mode):
    """Every similarity ties: no screened list can prove its candidates, so every src is decided
    by the float64 scan of all its dsts (lowest dst, then lowest src wins)."""
    k, v, text = make_inputs(2, 2, 2, 144, 4, 64, dtype, seed=11)
    k[:] = k[:, :, :1].clone()
    kwargs = dict(ratio=0.5, windows=windows, grid=(12, 12))
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), dtype)


@pytest.mark.parametrize("windows", WINDOWS_144_OR_36)
@pytest.mark.parametrize("metric_dtype", [torch.float64, torch.float32])
def test_given_metric_matches_reference(metric_dtype, windows, merge_mode):
    """A caller's metric (float64: screened in float64; float32: in float32 FMA)."""
    k, v, text = make_inputs(2, 2, 2, 144, 5, 32, torch.bfloat16, seed=12)
    gen = torch.Generator(device="cuda").manual_seed(13)
    metric = torch.randn(2, 144, 48, device="cuda", generator=gen, dtype=metric_dtype)
    kwargs = dict(ratio=0.5, windows=windows, grid=(12, 12), metric=metric)
    assert_same_compression(lightkv_ext.compress(k, v, text, **kwargs),
                            reference.compress(k, v, text, **kwargs), torch.bfloat16)


@pytest.mark.parametrize("windows", [
    pytest.param((3, 3), id="36-to-49-token-windows"),
    pytest.param((2, 2), id="100-token-windows"),
    pytest.param((1, 1), id="400-token-window"),
])
@pytest.mark.parametrize("metric_dtype", [None, torch.float64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_and_screened_modes_agree_bitwise(dtype, metric_dtype, windows):
    """max_window only picks the kernels: these windows run in exact mode (one tile pair, or
    tiled) with the true bound and in screened mode with a loose one, and both take the float64
    decisions."""
    from lightkv_ext import ops
    from lightkv_ext.windows import full_grid_layout

    k, v, _ = make_inputs(3, 4, 4, 20 * 20, 1, 64, dtype, seed=24)
    metric = k.permute(0, 2, 1, 3) if metric_dtype is None else torch.randn(
        3, 400, 1, 96, device="cuda", dtype=metric_dtype, generator=torch.Generator(device="cuda").manual_seed(25))
    importance = torch.rand(3, 400, device="cuda")
    sizes = torch.ones(3, 400, dtype=torch.int32, device="cuda")
    layout = full_grid_layout(((20, 20),) * 3, (windows,) * 3, 0.5, k.device)
    assert layout.max_window <= 512
    exact, screened = (ops.merge(k, v, metric, importance, sizes, layout.tokens, layout.offsets, 0.5, layout.kept[0],
                                 bound, False) for bound in (layout.max_window, 2**40))
    assert_bitwise_equal(exact, screened)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_zero_is_identity(dtype):
    k, v, text = make_inputs(2, 2, 2, 36, 5, 32, dtype, seed=8)
    out = lightkv_ext.compress(k, v, text, ratio=0.0, windows=2)
    assert_bitwise_equal((out.k, out.v), (k, v))
    assert torch.equal(out.index, torch.arange(36, device="cuda").expand(2, 36))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_deterministic_across_runs(dtype):
    k, v, text = make_inputs(4, 2, 8, 24 * 24, 33, 128, dtype, seed=9)
    runs = [lightkv_ext.compress(k, v, text, ratio=0.5, windows=1) for _ in range(3)]
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])


@pytest.mark.parametrize("grid", [(24, 24), (65, 64)], ids=["row-groups", "general-groups"])
def test_chained_launches_match_plain_launches(grid, monkeypatch):
    """Kernel chaining (programmatic dependent launch, opt-in with LIGHTKV_PDL=1) only moves
    launches earlier; the results must be bitwise those of plain stream order."""
    k, v, text = make_inputs(2, 4, 8, grid[0] * grid[1], 16, 64, torch.bfloat16, seed=21)
    kwargs = dict(ratio=0.5, windows=4, grid=grid)
    plain = lightkv_ext.compress(k, v, text, **kwargs)
    monkeypatch.setenv("LIGHTKV_PDL", "1")
    chained = lightkv_ext.compress(k, v, text, **kwargs)
    assert_bitwise_equal(chained, plain)


# Rows of 576, 1300 and 3072 tokens: number_row and group_row with 2, 4 and 8 tokens per thread;
# windows of 36 (one exact_select_kernel block each), 325 and 192 tokens (blocks of 16 srcs, the
# last one ranking). Tied keys put all of a window's merged srcs in one group (up to 162 members).
@pytest.mark.parametrize("keys", ["random", "tied"])
@pytest.mark.parametrize("grid,windows", [((24, 24), 4), ((26, 50), 2), ((48, 64), 4)],
                         ids=["rows-of-576", "rows-of-1300", "rows-of-3072"])
def test_exact_select_groups_rows_like_row_groups_kernel(grid, windows, keys, monkeypatch):
    """In exact mode exact_select_kernel lays out each window's groups and the block that
    completes a row's windows numbers the row's kept tokens; LIGHTKV_FUSED_GROUPS=0 groups the rows
    in row_groups_kernel after it instead (a block radix sort per row). The same groups in the same
    member order: bitwise the same results, and the reference's decisions."""
    k, v, text = make_inputs(3, 2, 4, grid[0] * grid[1], 8, 64, torch.bfloat16, seed=28)
    if keys == "tied":
        k = k[:, :, :1].expand_as(k).contiguous()
    kwargs = dict(ratio=0.5, windows=windows, grid=grid)
    fused = lightkv_ext.compress(k, v, text, **kwargs)
    monkeypatch.setenv("LIGHTKV_FUSED_GROUPS", "0")
    assert_bitwise_equal(lightkv_ext.compress(k, v, text, **kwargs), fused)
    assert_same_compression(fused, reference.compress(k, v, text, **kwargs), torch.bfloat16)


@pytest.mark.parametrize("B", [pytest.param(2, id="block-pairs-by-default"), pytest.param(32, id="groups-by-default")])
def test_exact_block_groups_match_block_pairs(B, monkeypatch):
    """exact_dots_kernel's two item shapes (LIGHTKV_EXACT_GROUP=1: one 8 x 8 block pair, =3: a
    36-token window's 3 x 3 block pairs) give every lane the same features in the same order: with
    the same feature split (one here: 2 heads x 64 dims make a single step) the whole result is
    bitwise the same, and the reference's."""
    monkeypatch.setenv("LIGHTKV_EXACT_DOTS", "float64")  # the float64 sums (batch 32 screens by default)
    k, v, text = make_inputs(B, 2, 4, 576, 8, 64, torch.bfloat16, seed=27)
    kwargs = dict(ratio=0.5, windows=4, grid=(24, 24))
    by_shape = lightkv_ext.compress(k, v, text, **kwargs)
    for group in ("1", "3"):
        monkeypatch.setenv("LIGHTKV_EXACT_GROUP", group)
        assert_bitwise_equal(lightkv_ext.compress(k, v, text, **kwargs), by_shape)
    assert_same_compression(by_shape, reference.compress(k, v, text, **kwargs), torch.bfloat16)


def test_exact_stacked_src_blocks_decide_as_the_reference(monkeypatch):
    """Block groups multiply their src blocks in pairs, one float64 mma.m16n8k4 per pair and dst
    block (sm_90 on), or one by one in mma.m8n8k4 (LIGHTKV_EXACT_MMA=8): the same products, whose
    last bits could round otherwise (on an H200 they did not); the decisions are the reference's,
    and where they are the same the whole result is bitwise the same (the values depend on the
    decisions only)."""
    monkeypatch.setenv("LIGHTKV_EXACT_DOTS", "float64")  # the float64 sums (batch 32 screens by default)
    k, v, text = make_inputs(32, 4, 8, 576, 8, 64, torch.bfloat16, seed=29)
    kwargs = dict(ratio=0.5, windows=4, grid=(24, 24))
    stacked = lightkv_ext.compress(k, v, text, **kwargs)
    monkeypatch.setenv("LIGHTKV_EXACT_MMA", "8")
    one_by_one = lightkv_ext.compress(k, v, text, **kwargs)
    assert_same_compression(stacked, reference.compress(k, v, text, **kwargs), torch.bfloat16)
    assert_bitwise_equal(stacked, one_by_one)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("keys", ["random", "tied", "cancelling"])
@pytest.mark.parametrize("group", ["1", "3"], ids=["block-pairs", "block-groups"])
def test_exact_screened_sums_decide_as_float64(group, keys, dtype, monkeypatch):
    """Exact mode's screened sums (16-bit tensor cores, float32 over 32 features; the default where
    exact_dots_kernel takes block groups), rechecked in float64 where they leave a src's best dst
    or the window's first r open, decide as the float64 sums do, and as the reference: bitwise the
    same result for LIGHTKV_EXACT_DOTS=float64, screened and recheck (every window rechecked), in
    both item shapes, on random keys, tied keys (every screened value tied) and keys whose screened
    cosines are off by far more than the gaps between them."""
    monkeypatch.setenv("LIGHTKV_EXACT_GROUP", group)
    k, v, text = make_inputs(4, 2, 4, 72, 4, 32, dtype, seed=31)
    if keys == "tied":
        k = k[:, :, :1].expand_as(k).contiguous()
    if keys == "cancelling":
        k = cancelling_keys(k)
    gen = torch.Generator(device="cuda").manual_seed(31)
    kwargs = dict(ratio=0.3, windows=(3, 1), grid=(6, 12), importance=torch.rand(4, 72, device="cuda", generator=gen))
    results = {}
    for dots in ("float64", "screened", "recheck"):
        monkeypatch.setenv("LIGHTKV_EXACT_DOTS", dots)
        results[dots] = lightkv_ext.compress(k, v, text, **kwargs)
    assert_same_compression(results["screened"], reference.compress(k, v, text, **kwargs), dtype)
    assert_bitwise_equal(results["screened"], results["float64"])
    assert_bitwise_equal(results["recheck"], results["float64"])


def test_exact_screened_sums_by_default_at_batch_32(monkeypatch):
    """LLaVA-1.5's shape at batch 32 (block groups) takes the screened sums by default: the
    reference's decisions, and bitwise the float64 sums' result."""
    k, v, text = make_inputs(32, 4, 8, 576, 8, 64, torch.bfloat16, seed=32)
    kwargs = dict(ratio=0.5, windows=4, grid=(24, 24))
    kernels = launched_kernels(lambda: lightkv_ext.compress(k, v, text, **kwargs))
    # exact_dots_kernel<bfloat16, 3 (block groups), true (stacked), true (screened)>
    assert any("exact_dots_kernel" in name and "3, true, true>" in name for name in kernels), kernels
    screened = lightkv_ext.compress(k, v, text, **kwargs)
    assert_same_compression(screened, reference.compress(k, v, text, **kwargs), torch.bfloat16)
    monkeypatch.setenv("LIGHTKV_EXACT_DOTS", "float64")
    assert_bitwise_equal(lightkv_ext.compress(k, v, text, **kwargs), screened)


@pytest.mark.parametrize("grid", [(24, 24), (65, 64)], ids=["row-groups", "general-groups"])
def test_overlapped_decisions_match_one_stream(grid, monkeypatch):
    """lightkv::compress runs the merge decisions on a second stream while it scores; with
    LIGHTKV_OVERLAP=0 all runs on the current stream. Same bits either way, also when the call is
    made on a non-default stream and its outputs are used at once (the join orders them)."""
    k, v, text = make_inputs(2, 4, 8, grid[0] * grid[1], 16, 64, torch.bfloat16, seed=24)
    kwargs = dict(ratio=0.5, windows=4, grid=grid)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        overlapped = [x.clone() for x in lightkv_ext.compress(k, v, text, **kwargs)]
    torch.cuda.current_stream().wait_stream(stream)
    monkeypatch.setenv("LIGHTKV_OVERLAP", "0")
    one_stream = lightkv_ext.compress(k, v, text, **kwargs)
    assert_bitwise_equal(overlapped, one_stream)


def test_cached_tables_are_ready_for_other_streams():
    """The first call builds and caches the window layout, image table and unit sizes on its stream;
    a call on another stream right after must not read them before they are written."""
    for cached in (api._dense_images, api._unit_sizes, api.full_grid_layout):
        cached.cache_clear()
    k, v, text = make_inputs(1, 2, 2, 23 * 29, 5, 32, torch.float16, seed=25)  # a shape of this test only
    kwargs = dict(ratio=0.5, windows=3, grid=(23, 29))
    busy, other = torch.cuda.Stream(), torch.cuda.Stream()
    for stream in (busy, other):
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(busy):
        torch.cuda._sleep(100_000_000)  # the caches are written behind this (about 50 ms)
        lightkv_ext.compress(k, v, text, **kwargs)
    with torch.cuda.stream(other):
        got = [x.clone() for x in lightkv_ext.compress(k, v, text, **kwargs)]
    torch.cuda.synchronize()
    for cached in (api._dense_images, api._unit_sizes, api.full_grid_layout):
        cached.cache_clear()
    assert_bitwise_equal(got, lightkv_ext.compress(k, v, text, **kwargs))


def assert_replays_like_calls(call, static, fresh):
    """call(*static) captured in a CUDA graph (after a warm-up call on a side stream, which builds
    what the call caches and loads the kernels), replayed with the values of fresh copied into
    static, gives bitwise what call(*fresh) gives."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(*static)
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    assert_bitwise_equal(captured, call(*fresh))


def test_compress_replays_from_a_cuda_graph():
    """No host synchronisation inside compress: it can be captured once (its second stream forked
    and joined inside the capture) and replayed on new inputs."""
    assert_replays_like_calls(lambda *inputs: lightkv_ext.compress(*inputs, ratio=0.5, windows=4, grid=(24, 24)),
                              make_inputs(1, 32, 32, 24 * 24, 64, 128, torch.bfloat16, seed=22),
                              make_inputs(1, 32, 32, 24 * 24, 64, 128, torch.bfloat16, seed=23))


def make_varlen_inputs(grids, text_tokens, H_kv, H_q, D, dtype, seed):
    """A packed pack of images with their own text spans, and its offsets as host lists."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cu_seqlens, cu_seqlens_text = [0], [0]
    for (h, w), t in zip(grids, text_tokens):
        cu_seqlens.append(cu_seqlens[-1] + h * w)
        cu_seqlens_text.append(cu_seqlens_text[-1] + t)
    k = torch.randn(cu_seqlens[-1], H_kv, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(cu_seqlens[-1], H_kv, D, device="cuda", generator=gen).to(dtype)
    text = torch.randn(cu_seqlens_text[-1], H_q, D, device="cuda", generator=gen).to(dtype)
    return (k, v, text), cu_seqlens, cu_seqlens_text


def test_compress_varlen_with_host_offsets_replays_from_a_cuda_graph():
    """With its offsets as host lists, compress_varlen reads nothing back: it can be captured and
    replayed on new inputs of the same pack."""
    grids, text_tokens = [(24, 24), (12, 20), (5, 7)], [64, 0, 9]  # the second image has no text
    static, cu, cu_text = make_varlen_inputs(grids, text_tokens, 4, 8, 128, torch.bfloat16, seed=24)
    fresh, _, _ = make_varlen_inputs(grids, text_tokens, 4, 8, 128, torch.bfloat16, seed=25)
    assert_replays_like_calls(lambda *inputs: lightkv_ext.compress_varlen(*inputs, cu, grids, cu_seqlens_text=cu_text,
                                                                          ratio=0.5, windows=2), static, fresh)


def test_compress_calls_do_not_sync_with_the_host():
    """After a first call of the same shapes, a dense compress and a compress_varlen with host
    offsets never wait for the GPU (torch's sync debug mode raises on any synchronizing call), also
    for a pack of 256 prompts of one image each, whose softmax statistics the bound images x text
    rows would size at 268 MB (the API passes the exact 16384 rows)."""
    dense = make_inputs(2, 4, 8, 12 * 12, 16, 64, torch.float16, seed=26)
    packed, cu, cu_text = make_varlen_inputs([(6, 6), (4, 9)], [5, 7], 4, 8, 64, torch.float16, seed=27)
    many_grids = [(4, 4)] * 256
    many, many_cu, many_cu_text = make_varlen_inputs(many_grids, [64] * 256, 2, 8, 32, torch.bfloat16, seed=28)
    calls = [lambda: lightkv_ext.compress(*dense, ratio=0.5, windows=4, grid=(12, 12)),
             lambda: lightkv_ext.compress_varlen(*packed, cu, [(6, 6), (4, 9)], cu_seqlens_text=cu_text,
                                                 ratio=0.5, windows=2),
             lambda: lightkv_ext.compress_varlen(*many, many_cu, many_grids, cu_seqlens_text=many_cu_text,
                                                 ratio=0.5, windows=2)]
    for call in calls:
        call()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def test_llava_compress_launches_five_kernels():
    """2 scoring and 3 merging kernels for a LLaVA-1.5 image (one image: no image_offsets_kernel;
    36-token windows: exact mode, which groups the rows in exact_select_kernel; 2 of the merging
    ones on compress's second stream): at 576 tokens launches cost as much as the bytes, so a new
    one should be a deliberate choice (csrc/cuda/score.cu, merge.cu)."""
    k, v, text = make_inputs(1, 32, 32, 24 * 24, 64, 128, torch.bfloat16, seed=20)
    kernels = launched_kernels(lambda: lightkv_ext.compress(k, v, text, ratio=0.5, windows=4, grid=(24, 24)))
    assert len([name for name in kernels if "lightkv_cuda" in name]) == 5, kernels


def test_inputs_are_not_modified():
    k, v, text = make_inputs(2, 2, 4, 64, 6, 32, torch.bfloat16, seed=10)
    mask = random_mask(2, 6, seed=11)
    copies = [x.clone() for x in (k, v, text, mask)]
    lightkv_ext.compress(k, v, text, ratio=0.5, windows=2, text_mask=mask)
    assert_bitwise_equal((k, v, text, mask), copies)


def test_strided_inputs_match_contiguous():
    """Token-major k / v (as a packed cache stores them) give the same result as contiguous ones."""
    B, H, N, D = 2, 4, 100, 64
    k_tm = torch.randn(B, N, H, D, device="cuda", dtype=torch.float16)
    v_tm = torch.randn(B, N, H, D, device="cuda", dtype=torch.float16)
    text = torch.randn(B, H, 7, D, device="cuda", dtype=torch.float16)
    k, v = k_tm.transpose(1, 2), v_tm.transpose(1, 2)
    got = lightkv_ext.compress(k, v, text, ratio=0.5, windows=2)
    want = lightkv_ext.compress(k.contiguous(), v.contiguous(), text, ratio=0.5, windows=2)
    assert_bitwise_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_varlen_equals_per_image_compress(dtype):
    grids = [(6, 6), (4, 9), (2, 3), (10, 7)]
    counts = [h * w for h, w in grids]
    H_kv, H_q, D = 2, 4, 64
    gen = torch.Generator(device="cuda").manual_seed(12)
    k = torch.randn(sum(counts), H_kv, D, device="cuda", generator=gen).to(dtype)
    v = torch.randn(sum(counts), H_kv, D, device="cuda", generator=gen).to(dtype)
    text = torch.randn(9, H_q, D, device="cuda", generator=gen).to(dtype)
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    cu_text = [0, 3, 3, 5, 9]  # image 1 has no text: uniform importance
    out = lightkv_ext.compress_varlen(k, v, text, torch.tensor(cu, dtype=torch.int32), grids,
                                      cu_seqlens_text=torch.tensor(cu_text, dtype=torch.int32), ratio=0.5,
                                      windows=2)
    for i, grid in enumerate(grids):
        rows = slice(cu[i], cu[i + 1])
        out_rows = slice(int(out.cu_seqlens[i]), int(out.cu_seqlens[i + 1]))
        if cu_text[i + 1] > cu_text[i]:
            t, mask = text[cu_text[i]:cu_text[i + 1]], None
        else:  # the same "no counted text" through a masked token
            t, mask = text[:1], torch.zeros(1, 1, dtype=torch.bool, device="cuda")
        t = t.permute(1, 0, 2)[None]
        ki, vi = k[rows].permute(1, 0, 2)[None], v[rows].permute(1, 0, 2)[None]
        kwargs = dict(ratio=0.5, windows=2, grid=grid, text_mask=mask)
        single = lightkv_ext.compress(ki, vi, t, **kwargs)
        assert_same_compression(single, reference.compress(ki, vi, t, **kwargs), dtype)
        assert torch.equal(out.index[out_rows], single.index[0])
        assert torch.equal(out.assignment[rows], single.assignment[0])
        assert torch.equal(out.sizes[out_rows], single.sizes[0])
        torch.testing.assert_close(out.importance[rows], single.importance[0], **SCORE_TOL)
        torch.testing.assert_close(out.k[out_rows], single.k[0].transpose(0, 1), **VALUE_TOL[dtype])
        torch.testing.assert_close(out.v[out_rows], single.v[0].transpose(0, 1), **VALUE_TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("grid,windows,B,dtype", [
    pytest.param((48, 60), 4, 32, torch.bfloat16, id="2880-tokens-B32"),
    pytest.param((128, 128), 8, 32, torch.float16, id="16384-tokens-B32-8x8-windows"),
    pytest.param((128, 128), 16, 8, torch.bfloat16, id="16384-tokens-B8-exact-64-token-windows"),
    pytest.param((128, 128), 1, 2, torch.bfloat16, id="16384-tokens-one-window"),
])
def test_large_matches_reference(grid, windows, B, dtype):
    N = grid[0] * grid[1]
    k, v, text = make_inputs(B, 2, 8, N, 24, 64, dtype, seed=13)
    kwargs = dict(ratio=0.5, windows=windows, grid=grid)
    got = lightkv_ext.compress(k, v, text, **kwargs)
    want = reference.compress(k, v, text, **kwargs)
    assert_same_compression(got, want, dtype)
    assert_bitwise_equal(lightkv_ext.compress(k, v, text, **kwargs), got)


@pytest.mark.slow
def test_past_2_31_elements_are_indexed_correctly():
    """k and v of 2^31 + elements: the last row must be merged like a small copy of it."""
    B, H, N, D = 1, 2, 2 ** 31 // (2 * 128) + 64, 128  # 2 * N * 128 > 2^31 per tensor
    side = math.isqrt(N)
    N = side * side + side  # grid (side, side + 1)
    try:
        k = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    text = torch.randn(B, 2, 4, D, device="cuda", dtype=torch.bfloat16)
    grid = (side, side + 1)
    out = lightkv_ext.compress(k, v, text, ratio=0.5, windows=(side, side + 1), grid=grid)
    # 1-token windows merge nothing: every token is copied, the tail included.
    assert_bitwise_equal((out.k, out.v), (k, v))
    out = lightkv_ext.compress(k, v, text, ratio=0.5, windows=(side // 2, (side + 1) // 2), grid=grid)
    # The group of the last output slot, recomputed from its members (tokens near the end).
    last = out.index.shape[1] - 1
    members = (out.assignment[0] == last).nonzero()[:, 0]
    assert members.max() >= N - 2 * (side + 1)
    if len(members) == 1:
        assert_bitwise_equal(out.k[0, :, last], k[0, :, members[0]])
    else:
        weights = out.importance[0, members]
        x = k[0][:, members].float()
        want = (x * weights[None, :, None]).sum(1) / weights.sum() if weights.sum() > 0 else x.mean(1)
        torch.testing.assert_close(out.k[0, :, last].float(), want, **VALUE_TOL[torch.bfloat16])


def test_cupy_arrays_in_and_out():
    cupy = pytest.importorskip("cupy")
    k, v, text = make_inputs(2, 2, 4, 36, 5, 32, torch.float32, seed=14)
    out = lightkv_ext.compress(cupy.from_dlpack(k), cupy.from_dlpack(v), cupy.from_dlpack(text), ratio=0.5,
                               windows=2)
    assert isinstance(out.k, cupy.ndarray)
    want = lightkv_ext.compress(k, v, text, ratio=0.5, windows=2)
    assert_bitwise_equal(torch.from_dlpack(out.k), want.k)
    assert torch.equal(torch.from_dlpack(out.index), want.index)


def test_op_errors_name_the_argument():
    k, v, _ = make_inputs(1, 2, 2, 16, 1, 8, torch.float32)
    metric = k.permute(0, 2, 1, 3)
    tokens = torch.arange(16, device="cuda")
    offsets = torch.tensor([0, 16], device="cuda")
    sizes = torch.ones(1, 16, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="importance must be on cuda"):
        torch.ops.lightkv.merge(k, v, metric, torch.ones(1, 16), sizes, tokens, offsets, 0.5, 8, 16, False)
    with pytest.raises(RuntimeError, match="v must have shape"):
        torch.ops.lightkv.merge(k, v[:, :1], metric, torch.ones(1, 16, device="cuda"), sizes, tokens, offsets,
                                0.5, 8, 16, False)


def test_score_with_overlapping_images_stays_in_bounds():
    # The contract forbids overlapping images (the CPU op raises); the CUDA op cannot check its
    # device table without a sync, so its result is undefined, but it must not index past its
    # buffers: 4 images over the same 256 tokens have 16 column tiles, more than the 8 tickets
    # that disjoint images over 256 tokens could need.
    N, T, D = 256, 5, 32
    k, _, text = make_inputs(1, 2, 4, N, T, D, torch.float32, seed=16)
    images = torch.tensor([[0, 0, N, 0, T]] * 4, device="cuda")
    sizes = torch.ones(1, N, dtype=torch.int32, device="cuda")
    importance = torch.ops.lightkv.score(k, text, images, None, sizes, 1.0 / math.sqrt(D))
    torch.cuda.synchronize()
    assert importance.shape == (1, N)
    assert torch.isfinite(importance).all() and (importance >= 0).all()


def test_score_with_too_small_text_rows_stays_in_bounds():
    """text_rows below the images' text rows (the CPU op raises) leaves the CUDA result undefined,
    but no kernel may index past the statistics it sized (compute-sanitizer checks the accesses)."""
    N, T, D = 520, 64, 32
    k, _, text = make_inputs(2, 1, 17, N, T, D, torch.bfloat16, seed=17)
    images = torch.tensor([[0, 0, N, 0, T], [1, 0, N, 0, T]], device="cuda")
    sizes = torch.ones(2, N, dtype=torch.int32, device="cuda")
    importance = torch.ops.lightkv.score(k, text, images, None, sizes, 1.0 / math.sqrt(D), 30)
    torch.cuda.synchronize()
    assert importance.shape == (2, N)


def _op_samples():
    B, H_kv, H_q, N, T, D = 2, 2, 4, 16, 5, 32
    k, v, text = make_inputs(B, H_kv, H_q, N, T, D, torch.float32, seed=15)
    images = torch.tensor([[b, 0, N, 0, T] for b in range(B)], device="cuda")
    importance = torch.rand(B, N, device="cuda")
    sizes = torch.ones(B, N, dtype=torch.int32, device="cuda")
    tokens = torch.arange(B * N, device="cuda")  # one window per row
    offsets = torch.arange(0, B * N + 1, N, device="cuda")
    kept = N - min(math.floor(0.5 * N + 1e-6), N // 2)
    score_args = (k, text, images, None, sizes, 1.0 / math.sqrt(D))
    merge_args = (k, v, k.permute(0, 2, 1, 3), importance, sizes, tokens, offsets, 0.5, kept, N, False)
    return score_args, merge_args


def test_opcheck():
    score_args, merge_args = _op_samples()
    torch.library.opcheck(torch.ops.lightkv.score.default, score_args)
    torch.library.opcheck(torch.ops.lightkv.merge.default, merge_args)
    token_major = merge_args[:-1] + (True,)
    torch.library.opcheck(torch.ops.lightkv.merge.default, token_major)
    k, text, images, mask, sizes, scale = score_args
    compress_args = (k, merge_args[1], text, images, mask, sizes, scale, *merge_args[2:3], *merge_args[5:])
    torch.library.opcheck(torch.ops.lightkv.compress.default, compress_args)
    text_rows = images[:, 4].sum().item()  # the exact bound, which the API passes
    torch.library.opcheck(torch.ops.lightkv.score.default, score_args + (text_rows,))
    torch.library.opcheck(torch.ops.lightkv.compress.default, compress_args + (text_rows,))
    bases = torch.zeros((2,) + tuple(merge_args[3].shape), dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.lightkv.merge.default, token_major + (bases,))
    torch.library.opcheck(torch.ops.lightkv.compress.default, compress_args + (text_rows, bases))
