"""LightKV on Hugging Face transformers models (tiny random-weight configs built in code)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightkv_ext  # noqa: E402
from lightkv_ext.hf import LightKV  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

IMAGE = 100          # image token id of every tiny model
VISION_START, VISION_END = 102, 103
SIDE = 8             # tiny LLaVA: 32x32 pixels, 4x4 patches -> 8x8 grid, 64 tokens per image
N_IMAGE = SIDE * SIDE


def tiny_llava(attn="sdpa", layers=4, dtype=torch.float32):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=512, pad_token_id=0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return transformers.LlavaForConditionalGeneration(config).to(dtype).eval()


def tiny_qwen(kind="qwen2_vl", attn="sdpa", layers=4):
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    else:
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      window_size=8, fullatt_block_indexes=[1])
    vision.update(patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=101,
                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    config._attn_implementation = attn
    return model_class(config).eval()


def tiny_llava_next():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=4, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=1024, pad_token_id=0)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE,
                                          vision_feature_layer=-1, vision_feature_select_strategy="default",
                                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def llava_next_inputs(model, image_sizes):
    """One prompt, one image per (H, W) size; the token count of each image comes from the model."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    sizes = torch.tensor(image_sizes)
    tiles = [image_size_to_num_patches(size, model.config.image_grid_pinpoints, 32) for size in image_sizes]
    pixels = torch.randn(len(sizes), max(tiles), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.model.get_image_features(pixels, sizes).pooler_output
    ids = [1, 5]
    for feature in features:
        ids += [IMAGE] * feature.shape[0] + [7]
    ids = torch.tensor([ids + [8, 9, 10]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_sizes=sizes)


def llava_row(images, before=(1, 5, 6), between=(7,), after=(8, 9, 10, 11)):
    ids = list(before)
    for i in range(images):
        ids += [IMAGE] * N_IMAGE + (list(between) if i < images - 1 else [])
    return ids + list(after)


def llava_batch(rows, n_images, seed=1):
    """Left-padded batch of token lists; one random image per image span."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def qwen_inputs(grids, seed=1):
    """One prompt with one image per (h, w) patch grid (before the 2x2 merge)."""
    gen = torch.Generator().manual_seed(seed)
    ids, pixels = [1, 5, 6], []
    for h, w in grids:
        ids += [VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END, 7, 8]
        pixels.append(torch.randn(h * w, 3 * 2 * 2 * 2, generator=gen))
    ids = torch.tensor([ids + [9, 10, 11]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.cat(pixels),
                image_grid_thw=torch.tensor([[1, h, w] for h, w in grids]),
                mm_token_type_ids=(ids == IMAGE).int())


def generate(model, inputs, steps=4, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **kwargs)


HALVING = dict(layers=(1, 2, 3), windows=(2, 1, 1), ratios=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------

def test_schedule_shrinks_each_layer_by_expected_tokens():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1)], 1)
    prompt = inputs["input_ids"].shape[1]
    with LightKV(**HALVING).patch(model):
        out = generate(model, inputs, steps=3)
    cache = out.cache
    logical = prompt + 2  # the last generated token is not cached
    # 64 vision tokens: 2x2 windows of 16 -> 32 kept, then one window: 16, then 8.
    assert [layer.keys.shape[-2] for layer in cache.layers] == [logical, logical - 32, logical - 48, logical - 56]
    assert all(layer.get_seq_length() == logical for layer in cache.layers)
    assert cache.get_seq_length() == logical


def test_multi_image_prompt_compresses_every_image():
    model = tiny_llava()
    inputs = llava_batch([llava_row(2)], 2)
    prompt = inputs["input_ids"].shape[1]
    with LightKV(**HALVING).patch(model):
        out = generate(model, inputs, steps=2)
    removed = [prompt + 1 - layer.keys.shape[-2] for layer in out.cache.layers]
    assert removed == [0, 64, 96, 112]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ratio_zero_is_bitwise_identical_llava(attn):
    model = tiny_llava(attn)
    inputs = llava_batch([llava_row(2), llava_row(1, after=(8, 9))], 3)
    reference = generate(model, inputs)
    with LightKV(layers=(0, 2), windows=(2, 1), ratios=(0.0, 0.0), proportional_attention=True).patch(model):
        patched = generate(model, inputs)
    assert torch.equal(patched.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(patched.logits, reference.logits))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_ratio_zero_is_bitwise_identical_qwen(kind):
    model = tiny_qwen(kind)
    inputs = qwen_inputs([(8, 8), (8, 12)])
    reference = generate(model, inputs)
    with LightKV(layers=(1, 3), windows=(2, 1), ratios=(0.0, 0.0)).patch(model):
        patched = generate(model, inputs)
    assert torch.equal(patched.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(patched.logits, reference.logits))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_shrinks_each_image_on_its_own_grid(kind):
    model = tiny_qwen(kind)
    inputs = qwen_inputs([(8, 8), (8, 12)])  # 4x4 and 4x6 grids after the merge
    prompt = inputs["input_ids"].shape[1]
    with LightKV(layers=(1, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model):
        out = generate(model, inputs, steps=2)
    removed = [prompt + 1 - layer.keys.shape[-2] for layer in out.cache.layers]
    # Stage 1: 2x2 windows of 4 and 6 tokens lose half: 16 -> 8, 24 -> 12. Stage 2: 8 -> 4, 12 -> 6.
    assert removed == [0, 20, 30, 30]


def test_llava_next_base_and_anyres_tiles_are_gridded():
    model = tiny_llava_next()
    inputs = llava_next_inputs(model, [[40, 60], [30, 30]])
    prompt = inputs["input_ids"].shape[1]
    reference = generate(model, inputs, steps=2)
    with LightKV(layers=(1, 2), windows=(2, 1), ratios=(0.0, 0.0)).patch(model):
        unchanged = generate(model, inputs, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(unchanged.logits, reference.logits))
    with LightKV(layers=(1, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model):
        out = generate(model, inputs, steps=2)
    removed = [prompt + 1 - layer.keys.shape[-2] for layer in out.cache.layers]
    # Grids: 8x8 base + 10x16 tiles (2x2 windows of 5x8) for the first image, 8x8 + 8x8 for the
    # second; newline tokens stay. Stage 1 halves every window, stage 2 halves again.
    assert removed == [0, 32 + 80 + 32 + 32, 176 + 16 + 40 + 16 + 16, 264]


def test_rows_keeping_different_counts_are_split_into_sub_batches():
    """Non-nested windows (3 then 2 bands on an 8x8 grid) leave images with different survivor
    counts per stage-2 window: the batched path must equal compressing each image alone."""
    from lightkv_ext.hf import _kept_after, _run_stages, _Stage
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(8, 2, N_IMAGE, 16, generator=gen), torch.randn(8, 2, N_IMAGE, 16, generator=gen)
    text, text_mask = torch.randn(8, 4, 5, 16, generator=gen), torch.ones(8, 5, dtype=torch.bool)
    stages = (_Stage(0, (3, 3), 0.4), _Stage(1, (2, 2), 0.4))
    first = lightkv_ext.compress(k, v, text, ratio=0.4, windows=3, grid=(SIDE, SIDE), text_mask=text_mask)
    positions = torch.arange(N_IMAGE).expand(8, -1).gather(1, first.index)
    assert len(set(_kept_after(positions, (SIDE, SIDE), (2, 2), 0.4))) == 3
    results = _run_stages(k, v, text, text_mask, (SIDE, SIDE), stages, scale=0.25)
    assert len(results) == 3
    assert sorted(int(r) for rows, *_ in results for r in rows) == list(range(8))
    for rows, k_out, v_out, sizes, pos in results:
        for j, row in enumerate(rows.tolist()):
            alone = _run_stages(k[row:row + 1], v[row:row + 1], text[row:row + 1], text_mask[row:row + 1],
                                (SIDE, SIDE), stages, scale=0.25)
            (_, k_alone, v_alone, sizes_alone, pos_alone), = alone
            assert torch.equal(k_out[j], k_alone[0]) and torch.equal(v_out[j], v_alone[0])
            assert torch.equal(sizes[j], sizes_alone[0]) and torch.equal(pos[j], pos_alone[0])


def test_patch_leaves_model_as_it_was():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1)], 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    registry = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    before = model(**inputs).logits  # transformers installs its output-capturing hooks on a first call
    hooks = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.named_modules()}
    forwards = {name: type(m).forward for name, m in model.named_modules()}
    with LightKV(**HALVING).patch(model):
        generate(model, inputs, steps=2)
    after = model(**inputs).logits
    assert torch.equal(before, after)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == registry
    for name, module in model.named_modules():
        assert (dict(module._forward_pre_hooks), dict(module._forward_hooks)) == hooks[name]
        assert "forward" not in vars(module) and type(module).forward is forwards[name]
    assert transformers.models.llama.modeling_llama.eager_attention_forward.__module__.endswith("modeling_llama")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_patch_is_undone_when_the_body_raises():
    model = tiny_llava()
    with pytest.raises(RuntimeError, match="boom"):
        with LightKV(**HALVING).patch(model):
            raise RuntimeError("boom")
    assert not model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_compressed_cache_holds_compress_of_the_layer_kv():
    """Layer 2's cache == two chained lightkv_ext.compress stages of its exact prefill K/V, guided by
    its own RoPE'd text queries (the tokens after the image)."""
    model = tiny_llava()
    inputs = llava_batch([llava_row(1)], 1)
    decoder = model.model.language_model
    with torch.no_grad():
        full = model(**inputs, use_cache=True, output_hidden_states=True)
    key, value = full.cache.layers[2].keys, full.cache.layers[2].values
    layer = decoder.layers[2]
    hidden = layer.input_layernorm(full.hidden_states[2])
    B, S, _ = hidden.shape
    query = layer.self_attn.q_proj(hidden).view(B, S, -1, 16).transpose(1, 2)
    position_ids = torch.arange(S)[None]
    cos, sin = decoder.rotary_emb(hidden, position_ids)
    query, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(query, query, cos, sin)
    start = 3
    vision = slice(start, start + N_IMAGE)
    text = query[:, :, start + N_IMAGE:]
    first = lightkv_ext.compress(key[:, :, vision], value[:, :, vision], text, ratio=0.5, windows=2,
                                 grid=(SIDE, SIDE), scale=layer.self_attn.scaling)
    second = lightkv_ext.compress(first.k, first.v, text, ratio=0.5, windows=1, grid=(SIDE, SIDE),
                                  scale=layer.self_attn.scaling, sizes=first.sizes,
                                  positions=torch.arange(N_IMAGE)[None].gather(1, first.index))
    expected_k = torch.cat([key[:, :, :start], second.k, key[:, :, start + N_IMAGE:]], dim=2)
    expected_v = torch.cat([value[:, :, :start], second.v, value[:, :, start + N_IMAGE:]], dim=2)

    with LightKV(**HALVING).patch(model), torch.no_grad():
        patched = model(**inputs, use_cache=True)
    compressed = patched.cache.layers[2]
    torch.testing.assert_close(compressed.keys, expected_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compressed.values, expected_v, rtol=1e-5, atol=1e-5)
    assert compressed.slot_sizes[0, start:start + 16].tolist() == second.sizes[0].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_rows_match_each_row_alone(attn):
    """Rows keep different numbers of tokens (2 images vs 1): the shorter row gets masked slots and
    must generate exactly what it generates alone."""
    model = tiny_llava(attn)
    rows = [llava_row(2), llava_row(1, after=(8, 9))]
    batch = llava_batch(rows, 3)
    lightkv = LightKV(**HALVING)
    with lightkv.patch(model):
        together = generate(model, batch, steps=4)
        for b, (row, first_image) in enumerate(zip(rows, (0, 2))):
            n_images = 2 if b == 0 else 1
            alone_inputs = llava_batch([row], 1)
            alone_inputs["pixel_values"] = batch["pixel_values"][first_image:first_image + n_images]
            alone = generate(model, alone_inputs, steps=4)
            assert torch.equal(together.sequences[b, -4:], alone.sequences[0, -4:])
            for step_batch, step_alone in zip(together.logits, alone.logits):
                torch.testing.assert_close(step_batch[b], step_alone[0], rtol=1e-4, atol=1e-4)
    # Layer 1 keeps 32 of each image's 64 tokens: 3 + 32 + 1 + 32 + 4 and 3 + 32 + 2 real slots.
    assert together.cache.layers[1].slot_valid.sum(dim=1).tolist() == [72, 37]


def test_qwen_left_padded_batch_rows_match_each_row_alone():
    model = tiny_qwen()
    rows = [qwen_inputs([(8, 8), (8, 12)]), qwen_inputs([(8, 12)], seed=2)]
    width = max(r["input_ids"].shape[1] for r in rows)

    def left_pad(x, value=0):
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    batch = dict(input_ids=torch.cat([left_pad(r["input_ids"]) for r in rows]),
                 attention_mask=torch.cat([left_pad(r["attention_mask"]) for r in rows]),
                 mm_token_type_ids=torch.cat([left_pad(r["mm_token_type_ids"]) for r in rows]),
                 pixel_values=torch.cat([r["pixel_values"] for r in rows]),
                 image_grid_thw=torch.cat([r["image_grid_thw"] for r in rows]))
    with LightKV(layers=(1, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model):
        together = generate(model, batch, steps=3)
        for b, row in enumerate(rows):
            alone = generate(model, row, steps=3)
            assert torch.equal(together.sequences[b, -3:], alone.sequences[0, -3:])
            for step_batch, step_alone in zip(together.logits, alone.logits):
                torch.testing.assert_close(step_batch[b], step_alone[0], rtol=1e-4, atol=1e-4)


def test_sdpa_and_eager_agree_under_compression():
    inputs = llava_batch([llava_row(2), llava_row(1)], 3)
    results = {}
    for attn in ("sdpa", "eager"):
        model = tiny_llava(attn)
        with LightKV(**HALVING, proportional_attention=True).patch(model):
            results[attn] = generate(model, inputs, steps=3)
    assert torch.equal(results["sdpa"].sequences, results["eager"].sequences)
    for a, b in zip(results["sdpa"].logits, results["eager"].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_proportional_attention_changes_decoding_only_when_tokens_merge():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1)], 1)
    with LightKV(**HALVING).patch(model):
        plain = generate(model, inputs, steps=2)
    with LightKV(**HALVING, proportional_attention=True).patch(model):
        proportional = generate(model, inputs, steps=2)
    assert torch.equal(plain.logits[0], proportional.logits[0])  # prefill is exact either way
    assert not torch.equal(plain.logits[1], proportional.logits[1])


@pytest.mark.parametrize("incoming", ["none", "bool", "float"])
@pytest.mark.parametrize("float_mask", [False, True])
@pytest.mark.parametrize("proportional", [False, True])
def test_decode_mask_of_a_compressed_layer(incoming, float_mask, proportional):
    """5 prefix slots (row 1: 2 padding slots) standing for 8 logical tokens, then 2 decoded tokens."""
    from lightkv_ext.hf import _lightkv_layer_class
    keys = torch.zeros(2, 2, 5, 4)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    sizes = torch.tensor([[1, 2, 1, 1, 1], [1, 3, 1, 1, 1]], dtype=torch.int32)
    layer = _lightkv_layer_class()(keys, keys, valid, sizes, prefill_length=8)
    assert layer.get_seq_length() == 8
    model_mask = {"none": None, "bool": torch.ones(2, 1, 2, 10, dtype=torch.bool),
                  "float": torch.zeros(2, 1, 2, 10)}[incoming]
    if model_mask is not None:  # the model's causal mask over the 2 new tokens
        model_mask[..., 0, 9] = False if incoming == "bool" else torch.finfo(torch.float32).min
    query, key = torch.zeros(2, 4, 2, 4), torch.zeros(2, 2, 7, 4)
    mask = layer.attention_mask(model_mask, query, key, float_mask=float_mask, proportional=proportional)
    single = layer.attention_mask(None, query[:, :, :1], key[:, :, :6], float_mask=float_mask,
                                  proportional=proportional)
    assert single is not None  # row 1 has padding slots: a single query still needs a mask
    allowed = torch.tensor([[[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]],
                            [[1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 1]]], dtype=torch.bool)[:, None]
    if mask.dtype == torch.bool:
        assert not float_mask and not proportional and incoming != "float"
        assert torch.equal(mask, allowed)
    else:
        assert torch.equal(mask > torch.finfo(torch.float32).min / 2, allowed)
        bias = torch.where(allowed, mask, torch.zeros(()))
        expected = torch.zeros(2, 1, 2, 7)
        if proportional:
            expected[0, ..., 1], expected[1, ..., 1] = torch.tensor(2.0).log(), torch.tensor(3.0).log()
        torch.testing.assert_close(bias, expected)


def test_single_query_over_all_valid_slots_needs_no_mask():
    from lightkv_ext.hf import _lightkv_layer_class
    keys = torch.zeros(1, 2, 5, 4)
    layer = _lightkv_layer_class()(keys, keys, torch.ones(1, 5, dtype=torch.bool),
                                   torch.tensor([[1, 2, 1, 1, 1]], dtype=torch.int32), prefill_length=6)
    query, key = torch.zeros(1, 4, 1, 4), torch.zeros(1, 2, 6, 4)
    assert layer.attention_mask(None, query, key, float_mask=False, proportional=False) is None
    assert layer.attention_mask(None, query, key, float_mask=False, proportional=True) is not None


def record_positions(rotary):
    seen = []
    def hook(module, args, kwargs, output):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())
    handle = rotary.register_forward_hook(hook, with_kwargs=True)
    return seen, handle


def test_decode_positions_continue_from_the_uncompressed_length():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1), llava_row(1, after=(8,))], 2)
    rotary = model.model.language_model.rotary_emb
    seen, handle = record_positions(rotary)
    generate(model, inputs, steps=4)
    reference, seen[:] = list(seen), []
    with LightKV(layers=(0, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model):
        generate(model, inputs, steps=4)
    handle.remove()
    assert len(seen) == len(reference) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen, reference))

    # A hand-written decode loop without position ids: the model derives them from the cache length.
    single = llava_batch([llava_row(1)], 1)
    prompt = single["input_ids"].shape[1]
    seen, handle = record_positions(rotary)
    with LightKV(layers=(0, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model), torch.no_grad():
        out = model(**single, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = model(input_ids=token, cache=out.cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    handle.remove()
    assert [p.flatten().tolist() for p in seen[1:]] == [[prompt], [prompt + 1], [prompt + 2]]
    assert out.cache.layers[0].keys.shape[-2] == prompt + 3 - 32


def test_qwen_decode_positions_follow_mrope():
    model = tiny_qwen()
    inputs = qwen_inputs([(8, 8), (8, 12)])
    seen, handle = record_positions(model.model.language_model.rotary_emb)
    generate(model, inputs, steps=3)
    reference, seen[:] = list(seen), []
    with LightKV(layers=(0, 2), windows=(2, 1), ratios=(0.5, 0.5)).patch(model):
        generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(seen, reference))


def test_sampling_generates_valid_tokens():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1), llava_row(2)], 3)
    torch.manual_seed(0)
    with LightKV(**HALVING).patch(model):
        out = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (2, 5)
    assert bool(((new >= 0) & (new < 128)).all())


def test_bfloat16_model():
    model = tiny_llava(dtype=torch.bfloat16)
    inputs = llava_batch([llava_row(1)], 1)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with LightKV(**HALVING).patch(model):
        out = generate(model, inputs, steps=3)
    assert out.cache.layers[3].keys.dtype == torch.bfloat16
    assert all(torch.isfinite(step).all() for step in out.logits)


def test_no_image_in_prompt_is_a_clear_error():
    model = tiny_llava()
    ids = torch.tensor([[1, 5, 6, 7]])
    with LightKV(**HALVING).patch(model):
        with pytest.raises(ValueError, match="no image tokens"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)


def test_static_cache_is_a_clear_error():
    model = tiny_llava()
    inputs = llava_batch([llava_row(1)], 1)
    with LightKV(**HALVING).patch(model):
        with pytest.raises(ValueError, match="needs a DynamicCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_nested_patch_on_one_model_is_refused():
    model = tiny_llava()
    with LightKV(**HALVING).patch(model):
        with pytest.raises(RuntimeError, match="already patched"):
            with LightKV(**HALVING).patch(model):
                pass
        assert model._forward_pre_hooks  # the outer patch is still installed


def test_unsupported_model_is_a_clear_error():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match="unsupported model family 'llama'"):
        with LightKV(**HALVING).patch(model):
            pass


def test_bad_schedule_and_layer_out_of_range():
    with pytest.raises(ValueError, match="layers"):
        LightKV(layers=(2, 1), windows=(1, 1), ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match="ratios"):
        LightKV(layers=(1,), windows=(1,), ratios=(1.0,))
    with pytest.raises(ValueError, match="one entry per stage"):
        LightKV(layers=(1, 2), windows=(1,), ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match="windows"):
        LightKV(layers=(1,), windows=(0,), ratios=(0.5,))
    with pytest.raises(ValueError, match="model has 4 layers"):
        with LightKV(layers=(4,), windows=(1,), ratios=(0.5,)).patch(tiny_llava()):
            pass
