"""Public API: bad input, varlen packing, torch.compile, DLPack interop, the demo."""
import re

import pytest
import torch

import lightkv_ext
from lightkv_ext import reference

from inputs import make_inputs


K, V, Q = make_inputs(T=3)

BAD_COMPRESS = [
    # (kwargs overriding the good call, exception type, words the message must contain)
    (dict(k=K[0]), ValueError, ["k", "4-D", "(2, 16, 8)"]),
    (dict(k=K.tolist()), TypeError, ["k", "torch.Tensor", "list"]),
    (dict(v=V[:, :1]), ValueError, ["v", "(2, 2, 16, 8)"]),
    (dict(text_emb=Q[:1]), ValueError, ["text_emb", "B = 2"]),
    (dict(text_emb=Q[..., :4]), ValueError, ["text_emb", "D = 8"]),
    (dict(text_emb=torch.randn(2, 3, 3, 8)), ValueError, ["text_emb", "multiple", "H_kv = 2"]),
    (dict(k=K.long(), v=V.long()), TypeError, ["k", "float32, float16 or bfloat16", "int64"]),
    (dict(k=K.double(), v=V.double(), text_emb=Q.double()), TypeError, ["k", "float64"]),
    (dict(v=V.half()), TypeError, ["v", "dtype of k"]),
    (dict(text_emb=Q.half()), TypeError, ["text_emb", "dtype of k"]),
    (dict(k=K[:, :, :0], v=V[:, :, :0]), ValueError, ["k", "non-empty"]),
    (dict(text_emb=Q[:, :, :0]), ValueError, ["text_emb", "non-empty"]),
    (dict(ratio=1.0), ValueError, ["ratio", "[0, 1)", "1.0"]),
    (dict(ratio=-0.1), ValueError, ["ratio", "-0.1"]),
    (dict(ratio="half"), TypeError, ["ratio"]),
    (dict(ratio=True), TypeError, ["ratio"]),
    (dict(windows=5), ValueError, ["windows", "(5, 5)", "(4, 4)"]),
    (dict(windows=(1, 2, 3)), TypeError, ["windows"]),
    (dict(windows=0), ValueError, ["windows"]),
    (dict(grid=(3, 5)), ValueError, ["grid", "16", "(3, 5)"]),
    (dict(grid=(4,)), TypeError, ["grid"]),
    (dict(grid=None, k=K[:, :, :15], v=V[:, :, :15]), ValueError, ["grid", "perfect square", "pass grid"]),
    (dict(text_mask=torch.ones(2, 3)), TypeError, ["text_mask", "torch.bool"]),
    (dict(text_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["text_mask", "(2, 3)"]),
    (dict(scale=0.0), ValueError, ["scale"]),
    (dict(scale=float("nan")), ValueError, ["scale"]),
    (dict(importance=-torch.ones(2, 16)), ValueError, ["importance", "negative"]),
    (dict(importance=torch.full((2, 16), float("nan"))), ValueError, ["importance", "NaN"]),
    (dict(importance=torch.full((2, 16), float("inf"))), ValueError, ["importance", "Inf"]),
    (dict(importance=torch.ones(2, 15)), ValueError, ["importance", "(2, 16)"]),
    (dict(importance=torch.ones(2, 16, dtype=torch.long)), TypeError, ["importance", "floating"]),
    (dict(metric=torch.ones(2, 15, 4)), ValueError, ["metric", "N = 16"]),
    (dict(metric=torch.ones(2, 16)), ValueError, ["metric", "3-D"]),
    (dict(sizes=torch.zeros(2, 16, dtype=torch.int32)), ValueError, ["sizes", ">= 1"]),
    (dict(sizes=torch.ones(2, 16)), TypeError, ["sizes", "integer"]),
    (dict(positions=torch.arange(16).expand(2, 16), grid=None), ValueError, ["grid", "positions are given"]),
    (dict(positions=torch.arange(16).flip(0).expand(2, 16), grid=(4, 4)), ValueError, ["positions", "increasing"]),
    (dict(positions=torch.arange(16).expand(2, 16) + 1, grid=(4, 4)), ValueError, ["positions", "[0, 16)"]),
    (dict(positions=torch.arange(16).expand(2, 16), grid=(3, 3)), ValueError, ["grid", "do not fit"]),
    (dict(text_emb=Q.to("meta")), ValueError, ["text_emb", "device"]),
]


@pytest.mark.parametrize("api", [lightkv_ext.compress, reference.compress], ids=["ext", "reference"])
@pytest.mark.parametrize("override, error, words", BAD_COMPRESS, ids=[str(i) for i in range(len(BAD_COMPRESS))])
def test_bad_input_raises_a_clear_error(api, override, error, words):
    call = dict(k=K, v=V, text_emb=Q, ratio=0.5, windows=2, grid=(4, 4))
    call.update(override)
    with pytest.raises(error) as info:
        api(call.pop("k"), call.pop("v"), call.pop("text_emb"), **call)
    message = str(info.value)
    assert message.split(":")[0].split(",")[0] in {"k", "v", "text_emb"} | set(override), message
    for word in words:
        assert word in message, message


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="text_emb"):
        lightkv_ext.score(K, Q[:1])
    with pytest.raises(ValueError, match="sizes"):
        lightkv_ext.score(K, Q, sizes=torch.ones(2, 5, dtype=torch.int64))


def _pack(seed=0, dtype=torch.float32):
    """Three images with different grids, their own prompts, one with no text at all."""
    gen = torch.Generator().manual_seed(seed)
    grids, n_text = [(4, 6), (1, 1), (5, 5)], [3, 2, 0]
    H, g, D = 2, 2, 8
    ks = [torch.randn(h * w, H, D, generator=gen).to(dtype) for h, w in grids]
    vs = [torch.randn(h * w, H, D, generator=gen).to(dtype) for h, w in grids]
    texts = [torch.randn(t, H * g, D, generator=gen).to(dtype) for t in n_text]
    return grids, ks, vs, texts


def _cumsum(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_per_image_compress(dtype):
    grids, ks, vs, texts = _pack(dtype=dtype)
    packed = lightkv_ext.compress_varlen(
        torch.cat(ks), torch.cat(vs), torch.cat(texts), torch.tensor(_cumsum(len(k) for k in ks)), grids,
        cu_seqlens_text=_cumsum(len(t) for t in texts), ratio=0.5, windows=1)
    for i, (grid, k, v, t) in enumerate(zip(grids, ks, vs, texts)):
        rows = slice(packed.cu_seqlens[i], packed.cu_seqlens[i + 1])
        text = t.transpose(0, 1)[None] if len(t) else torch.zeros(1, 4, 1, 8, dtype=dtype)
        mask = torch.ones(1, text.shape[2], dtype=torch.bool) if len(t) else torch.zeros(1, 1, dtype=torch.bool)
        alone = lightkv_ext.compress(k.transpose(0, 1)[None], v.transpose(0, 1)[None], text, ratio=0.5,
                                     grid=grid, text_mask=mask)
        assert torch.equal(packed.k[rows], alone.k[0].transpose(0, 1))
        assert torch.equal(packed.v[rows], alone.v[0].transpose(0, 1))
        assert torch.equal(packed.index[rows], alone.index[0])
        assert torch.equal(packed.sizes[rows], alone.sizes[0])
        tokens = slice(_cumsum(len(k) for k in ks)[i], _cumsum(len(k) for k in ks)[i + 1])
        assert torch.equal(packed.assignment[tokens], alone.assignment[0])
        assert torch.equal(packed.importance[tokens], alone.importance[0])
    assert packed.k.is_contiguous()


def test_varlen_results_do_not_share_the_cached_tables():
    """The offsets a call returns are its own: writing them leaves the next call of the same
    shapes (whose tables come from the cache) unchanged."""
    grids, ks, vs, texts = _pack()
    args = (torch.cat(ks), torch.cat(vs), torch.cat(texts), _cumsum(len(k) for k in ks), grids)
    first = lightkv_ext.compress_varlen(*args, windows=1)
    want = first.cu_seqlens.clone(), first.index.clone(), first.assignment.clone()
    first.cu_seqlens.fill_(-1)
    first.index.fill_(-1)
    first.assignment.fill_(-1)
    again = lightkv_ext.compress_varlen(*args, windows=1)
    assert all(torch.equal(got, expected) for got, expected in
               zip((again.cu_seqlens, again.index, again.assignment), want))


def test_varlen_second_stage_with_positions_and_shared_prompt():
    grids, ks, vs, texts = _pack()
    k, v, text = torch.cat(ks), torch.cat(vs), torch.cat(texts[:1])
    cu = _cumsum(len(x) for x in ks)
    first = lightkv_ext.compress_varlen(k, v, text, cu, grids, windows=1, text_ranges=[(0, 3)] * 3)
    second = lightkv_ext.compress_varlen(first.k, first.v, text, first.cu_seqlens, grids, windows=1,
                                         sizes=first.sizes, positions=first.index)
    assert second.sizes.sum() == len(k)
    for i in range(3):
        rows = slice(second.cu_seqlens[i], second.cu_seqlens[i + 1])
        assert int(second.sizes[rows].sum()) == grids[i][0] * grids[i][1]


@pytest.mark.parametrize("override, error, words", [
    (dict(cu_seqlens=[0, 10, 49]), ValueError, ["cu_seqlens", "total_N = 50"]),
    (dict(cu_seqlens=[0, 24, 24, 50]), ValueError, ["cu_seqlens", "strictly increasing"]),
    (dict(grids=[(4, 6), (1, 1)]), ValueError, ["grids", "3 images"]),
    (dict(grids=[(4, 6), (1, 1), (5, 4)]), ValueError, ["grid", "25"]),
    (dict(cu_seqlens_text=[0, 3, 5], text_ranges=[(0, 1)] * 3), ValueError, ["cu_seqlens_text, text_ranges"]),
    (dict(text_ranges=[(0, 9)] * 3), ValueError, ["text_ranges", "total_T = 5"]),
    (dict(windows=2), ValueError, ["windows", "(1, 1)"]),
    (dict(sizes=torch.ones(49, dtype=torch.int32)), ValueError, ["sizes", "(total_N) = (50)"]),
    (dict(positions=torch.cat([torch.arange(24), torch.arange(1), torch.arange(25) + 1])), ValueError,
     ["positions (image 2)", "[0, 25)"]),
    (dict(positions=torch.cat([torch.arange(24).flip(0), torch.arange(1), torch.arange(26)[1:]])), ValueError,
     ["positions (image 0)", "increasing"]),
])
def test_varlen_bad_input(override, error, words):
    grids, ks, vs, texts = _pack()
    call = dict(k=torch.cat(ks), v=torch.cat(vs), text_emb=torch.cat(texts), cu_seqlens=[0, 24, 25, 50],
                grids=grids)
    call.update(override)
    with pytest.raises(error) as info:
        lightkv_ext.compress_varlen(call.pop("k"), call.pop("v"), call.pop("text_emb"), call.pop("cu_seqlens"),
                                    call.pop("grids"), **call)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_compress_runs_under_torch_compile():
    k, v, q = make_inputs(N=36, T=3)
    eager = lightkv_ext.compress(k, v, q, ratio=0.5, windows=2)
    compiled = torch.compile(lightkv_ext.compress)(k, v, q, ratio=0.5, windows=2)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_native_ops_compile_without_graph_breaks():
    from lightkv_ext import ops
    from lightkv_ext.windows import full_grid_layout

    k, v, q = make_inputs(N=36, T=3)
    layout = full_grid_layout(((6, 6),) * 2, ((2, 2),) * 2, 0.5, k.device)
    images = torch.tensor([[0, 0, 36, 0, 3], [1, 0, 36, 0, 3]])
    ones = torch.ones(2, 36, dtype=torch.int32)

    def both(k, v, q):
        importance = ops.score(k, q, images, None, None, 0.25)
        return ops.merge(k, v, k.permute(0, 2, 1, 3), importance, ones, layout.tokens, layout.offsets,
                         0.5, layout.kept[0], layout.max_window, False)

    eager = both(k, v, q)
    compiled = torch.compile(both, fullgraph=True)(k, v, q)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_dlpack_inputs_are_accepted():
    k, v, q = make_inputs(N=16, T=3)
    plain = lightkv_ext.compress(k, v, q, grid=(4, 4))

    class Foreign:  # any object exporting DLPack, as CuPy or JAX arrays do
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, **kwargs):
            return self.tensor.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    wrapped = lightkv_ext.compress(Foreign(k), Foreign(v), Foreign(q), grid=(4, 4))
    assert all(torch.equal(a, b) for a, b in zip(plain, wrapped))
    # a foreign array among the keyword arguments only is converted too
    weighted = lightkv_ext.compress(k, v, q, grid=(4, 4), importance=Foreign(plain.importance))
    assert all(torch.equal(a, b) for a, b in zip(plain, weighted))


def test_demo_prints_every_stage(capsys):
    from lightkv_ext import demo

    demo.main(["--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if re.match(r"^\d: ", line)]
    assert [int(line.split()[4]) for line in rows] == [288, 144, 72]
    errors = [float(line.split()[-1]) for line in rows]
    assert errors == sorted(errors) and 0 < errors[0] < errors[-1] < 1
