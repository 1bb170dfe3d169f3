"""LightKV for Hugging Face transformers models, without forking their modeling code.

    from lightkv_ext.hf import LightKV
    lightkv = LightKV(layers=(12, 18, 24), windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))
    with lightkv.patch(model):
        out = model.generate(**inputs, max_new_tokens=64)

How it works. Inside ``patch`` the attention function of the model's attention implementation
is wrapped ("sdpa": its entry in transformers' attention registry; "eager": the modeling file's
``eager_attention_forward``); the wrapper acts on this model's decoder layers only, every other
module passes straight through. At the prefill of an empty cache every decoder layer attends
exactly as usual; then each layer ``l >= layers[0]`` replaces the vision part of its own cache
layer with the output of every stage scheduled at or before ``l``, in order (``lightkv_ext.compress``
guided by the same layer's text queries after RoPE; a later stage windows the survivors on the
original grid). Decode steps then read the shorter cache. A compressed cache layer
(``LightKVLayer``) reports the uncompressed ("logical") length, so position ids, M-RoPE deltas and
the model's mask sizes continue from the uncompressed sequence; the wrapper rebuilds the attention
mask of each compressed layer from its own kept-slot mask (rows of a batch may keep different
numbers of tokens: the shorter rows get masked padding slots). Windows larger than an image's grid
are clamped to the grid.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import sys
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import lightkv_ext
from lightkv_ext.windows import merge_count, window_labels

SUPPORTED_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
SUPPORTED_ATTENTION = ("sdpa", "eager")
_PATCHED = weakref.WeakSet()  # models inside a patch() context


def _transformers():
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError as err:  # pragma: no cover - exercised only without the [hf] extra
        raise ImportError("lightkv_ext.hf needs transformers: pip install 'lightkv_ext[hf]'") from err
    return DynamicCache, DynamicLayer, ALL_ATTENTION_FUNCTIONS


@dataclass(frozen=True)
class _Stage:
    layer: int
    windows: Tuple[int, int]
    ratio: float


class LightKV:
    """A LightKV schedule: stage ``i`` starts at decoder layer ``layers[i]`` with ``windows[i]``
    (int ``p`` for p x p windows, or ``(ph, pw)``) and removes ``ratios[i]`` of each window's
    tokens. Layer ``l`` applies every stage with ``layers[i] <= l``, so the example in the module
    docstring keeps 50% of the vision tokens in layers 12-17, 25% in 18-23 and 12.5% from 24 on.

    ``proportional_attention``: during decoding add ``log(size)`` to the attention logits of each
    merged token (size = original tokens it stands for), as in ToMe's proportional attention.
    """

    def __init__(self, layers: Sequence[int] = (12, 18, 24), windows: Sequence = (4, 2, 1),
                 ratios: Sequence[float] = (0.5, 0.5, 0.5), *, proportional_attention: bool = False):
        layers, windows, ratios = tuple(layers), tuple(windows), tuple(ratios)
        if not layers:
            raise ValueError("layers: expected at least one stage, got an empty sequence")
        if not len(layers) == len(windows) == len(ratios):
            raise ValueError(f"layers, windows, ratios: expected one entry per stage each, got lengths "
                             f"{len(layers)}, {len(windows)}, {len(ratios)}")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise ValueError(f"layers: expected non-negative ints, got {layers}")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers: expected strictly increasing decoder layer indices, got {layers}")
        for ratio in ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratios: expected floats in [0, 1), got {ratios}")
        self.stages = tuple(_Stage(int(layer), _window_pair(win), float(ratio))
                            for layer, win, ratio in zip(layers, windows, ratios))
        self.proportional_attention = bool(proportional_attention)

    def stages_at(self, layer_idx: int) -> Tuple[_Stage, ...]:
        """The stages decoder layer ``layer_idx`` applies to its own cache, in order."""
        return tuple(stage for stage in self.stages if stage.layer <= layer_idx)

    @contextlib.contextmanager
    def patch(self, model):
        """Context manager: LightKV is on for ``model`` inside, and the model is exactly as before
        after it (hooks removed, attention registry restored)."""
        patcher = _Patcher(self, model)
        patcher.install()
        try:
            yield model
        finally:
            patcher.uninstall()


def _window_pair(windows) -> Tuple[int, int]:
    pair = (windows, windows) if isinstance(windows, numbers.Integral) else windows
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or any(isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1 for p in pair)):
        raise ValueError(f"windows: expected an int p >= 1 or a pair (ph, pw) per stage, got {windows!r}")
    return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------------------------
# Model families: where the vision tokens are and which grid each image lies on.

@dataclass
class _Image:
    """One gridded image: its batch row, its cache slots in raster order and its grid (h, w)."""
    row: int
    slots: List[int]
    grid: Tuple[int, int]


class _Family:
    """Per-family knowledge: the image token id and how image-token runs split into gridded images."""

    def __init__(self, model):
        config = model.config
        self.name = config.model_type
        token_id = getattr(config, "image_token_id", None)
        self.image_token_id = int(token_id if token_id is not None else config.image_token_index)
        self.config = config
        self.newline = getattr(getattr(model, "model", None), "image_newline", None)
        if self.name in ("llava", "llava_next"):
            vision = config.vision_config
            self.side = vision.image_size // vision.patch_size
            if config.vision_feature_select_strategy != "default":
                raise ValueError(f"LightKV: {self.name} with vision_feature_select_strategy="
                                 f"{config.vision_feature_select_strategy!r} puts the CLS token in the "
                                 "image span, which has no grid cell; use 'default'")

    def images(self, runs: List[Tuple[int, int, int]], call_kwargs: dict, embeds) -> List[_Image]:
        """Gridded images of the (row, start, end) runs of image tokens, in prompt order."""
        if self.name == "llava":
            return self._llava(runs)
        if self.name == "llava_next":
            return self._llava_next(runs, embeds)
        return self._qwen(runs, call_kwargs)

    def _llava(self, runs):
        n = self.side * self.side
        images = []
        for row, start, end in runs:
            if (end - start) % n:
                raise ValueError(f"LightKV: an image span of {end - start} tokens in row {row} is not a whole "
                                 f"number of {self.side}x{self.side} LLaVA images")
            images += [_Image(row, list(range(p, p + n)), (self.side, self.side)) for p in range(start, end, n)]
        return images

    def _llava_next(self, runs, embeds):
        """Each image: the base image on its square grid, then the anyres tiles (unpadded) on their
        (rows, cols) grid. The image_newline token that ends every tile row is left as it is; it is
        found by its embedding, so no image_sizes are needed."""
        n = self.side * self.side
        images = []
        for row, start, end in runs:
            newline = (embeds[row, start:end] == self.newline.to(embeds.dtype)).all(dim=-1).tolist()
            pos = start
            while pos < end:
                if pos + n > end or any(newline[pos - start:pos - start + n]):
                    raise ValueError(f"LightKV: cannot find a {self.side}x{self.side} base image at token {pos} "
                                     f"of row {row}")
                images.append(_Image(row, list(range(pos, pos + n)), (self.side, self.side)))
                pos += n
                if pos < end and newline[pos - start]:  # a single-tile image: base + one newline
                    pos += 1
                    continue
                first_newline = next((i for i in range(pos, end) if newline[i - start]), None)
                if first_newline is None:
                    raise ValueError(f"LightKV: no image_newline ends the anyres tile rows after token {pos} "
                                     f"of row {row}")
                width, slots = first_newline - pos, []
                # Rows of `width` tile tokens, each closed by a newline, until the pattern breaks.
                while (pos + width < end and newline[pos + width - start]
                       and not any(newline[pos - start:pos + width - start])):
                    slots += range(pos, pos + width)
                    pos += width + 1
                if slots:
                    images.append(_Image(row, slots, (len(slots) // width, width)))
        return images

    def _qwen(self, runs, call_kwargs):
        # Frames of one image are stacked along the rows (images have t == 1).
        grid_thw = call_kwargs.get("image_grid_thw")
        if grid_thw is not None:
            merge = self.config.vision_config.spatial_merge_size
            sizes = [(t * (h // merge), w // merge) for t, h, w in grid_thw.tolist()]
            images, next_image = [], iter(sizes)
            for row, start, end in runs:
                pos = start
                while pos < end:
                    grid = next(next_image, None)
                    if grid is None or pos + grid[0] * grid[1] > end:
                        raise ValueError("LightKV: image_grid_thw does not match the image tokens of the prompt")
                    images.append(_Image(row, list(range(pos, pos + grid[0] * grid[1])), grid))
                    pos += grid[0] * grid[1]
            if next(next_image, None) is not None:
                raise ValueError("LightKV: image_grid_thw lists more images than the prompt holds")
            return images
        # generate() encodes the images before the first forward and passes only the M-RoPE
        # position ids, whose (t, h, w) components span each image's grid.
        position_ids = call_kwargs.get("position_ids")
        if position_ids is None or position_ids.ndim != 3:
            raise ValueError(f"LightKV: {self.name} needs image_grid_thw or 3-D (M-RoPE) position_ids in the "
                             "prefill call to grid its images")
        images = []
        for row, start, end in runs:
            t, h, w = (int(p.max() - p.min()) + 1 for p in position_ids[-3:, row, start:end])
            if t * h * w != end - start:
                raise ValueError(f"LightKV: the M-RoPE positions of the image at row {row}, tokens "
                                 f"{start}:{end}, do not form a grid")
            images.append(_Image(row, list(range(start, end)), (t * h, w)))
        return images


def _family(model) -> _Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"LightKV: unsupported model family {model_type!r} ({type(model).__name__}); "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    return _Family(model)


def _decoder(model):
    inner = getattr(model, "model", None)
    decoder = getattr(inner, "language_model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"LightKV: cannot find the language model decoder of {type(model).__name__} "
                         "(expected model.model.language_model.layers)")
    return decoder


# ----------------------------------------------------------------------------------------------
# Prefill plan: which cache slots are vision tokens of which image, and which text queries guide them.

@dataclass
class _ImageGroup:
    """Images of one grid, batched into one compress call per stage."""
    grid: Tuple[int, int]
    rows: torch.Tensor      # (G,) batch row of each image
    vision: torch.Tensor    # (G, N) cache slots of the image's tokens, raster order
    text: torch.Tensor      # (G, T) cache slots of its text queries (padded with 0)
    text_mask: torch.Tensor  # (G, T) True where the text slot is real


@dataclass
class _Plan:
    groups: List[_ImageGroup]
    token_valid: torch.Tensor   # (B, S) False at padding
    is_vision: torch.Tensor     # (B, S) True at vision slots that get compressed


def _runs(flags: List[bool]) -> List[Tuple[int, int]]:
    """(start, end) of every run of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _make_plan(family: _Family, input_ids: torch.Tensor, token_valid: torch.Tensor, call_kwargs: dict,
               embeds: Optional[torch.Tensor]) -> _Plan:
    """Text queries of an image: the real, non-image prompt tokens after the image's last token
    (the tokens that attend to it causally). An image at the very end of the prompt gets uniform
    importance (plain merging)."""
    device = input_ids.device
    is_image = (input_ids == family.image_token_id) & token_valid
    image_rows = is_image.tolist()
    runs = [(b, s, e) for b, row in enumerate(image_rows) for s, e in _runs(row)]
    if not runs:
        raise ValueError(f"LightKV: no image tokens (id {family.image_token_id}) in the prompt; "
                         "LightKV compresses vision tokens, call the model outside lightkv.patch() "
                         "for text-only prompts")
    by_grid: Dict[Tuple[int, int], List[Tuple[_Image, List[int]]]] = {}
    valid_rows = token_valid.tolist()
    is_vision = torch.zeros_like(is_image)
    for image in family.images(runs, call_kwargs, embeds):
        row = image.row
        text = [i for i in range(image.slots[-1] + 1, len(valid_rows[row]))
                if valid_rows[row][i] and not image_rows[row][i]]
        by_grid.setdefault(image.grid, []).append((image, text))
        is_vision[row, image.slots] = True
    groups = []
    for grid, members in by_grid.items():
        width = max(1, max(len(text) for _, text in members))
        text_slots = torch.zeros(len(members), width, dtype=torch.long)
        text_mask = torch.zeros(len(members), width, dtype=torch.bool)
        for i, (_, text) in enumerate(members):
            text_slots[i, :len(text)] = torch.tensor(text, dtype=torch.long)
            text_mask[i, :len(text)] = True
        groups.append(_ImageGroup(
            grid=grid,
            rows=torch.tensor([image.row for image, _ in members], device=device),
            vision=torch.tensor([image.slots for image, _ in members], device=device),
            text=text_slots.to(device),
            text_mask=text_mask.to(device),
        ))
    return _Plan(groups=groups, token_valid=token_valid, is_vision=is_vision)


# ----------------------------------------------------------------------------------------------
# Compression of one layer's cache.

@dataclass
class _Merged:
    """Merged anchors of a batch of images that kept the same number M of tokens."""
    rows: torch.Tensor   # (I,) batch row of each image
    slots: torch.Tensor  # (I, M) cache slots of the kept anchors
    k: torch.Tensor      # (I, H, M, D)
    v: torch.Tensor
    sizes: torch.Tensor  # (I, M) original tokens each anchor stands for


def _kept_after(positions: torch.Tensor, grid, windows, ratio) -> List[int]:
    """Tokens each row keeps when ``windows`` at ``ratio`` run on ``positions`` (B, N)."""
    n_windows = windows[0] * windows[1]
    labels = window_labels(positions, grid, windows)
    offsets = torch.arange(positions.shape[0], device=positions.device)[:, None] * n_windows
    counts = torch.bincount((labels + offsets).reshape(-1), minlength=positions.shape[0] * n_windows)
    counts = counts.reshape(positions.shape[0], n_windows).tolist()
    return [sum(n - merge_count(n, ratio) for n in row) for row in counts]


def _run_stages(k, v, text, text_mask, grid, stages, scale, positions=None, sizes=None):
    """Apply ``stages`` in order to a batch of images of one grid. Rows whose next stage would keep
    different token counts are split into sub-batches (compress needs one count per call).
    Returns a list of (row ids, k, v, sizes, positions)."""
    rows = torch.arange(k.shape[0], device=k.device)
    for i, stage in enumerate(stages):
        win = (min(stage.windows[0], grid[0]), min(stage.windows[1], grid[1]))
        if positions is not None:
            kept = _kept_after(positions, grid, win, stage.ratio)
            if len(set(kept)) > 1:
                results = []
                for value in sorted(set(kept)):
                    pick = torch.tensor([j for j, n in enumerate(kept) if n == value], device=k.device)
                    for sub_rows, *rest in _run_stages(k[pick], v[pick], text[pick], text_mask[pick], grid,
                                                       stages[i:], scale, positions[pick], sizes[pick]):
                        results.append((pick[sub_rows], *rest))
                return [(rows[r], *rest) for r, *rest in results]
        out = lightkv_ext.compress(k, v, text, ratio=stage.ratio, windows=win, grid=grid, text_mask=text_mask,
                                   scale=scale, sizes=sizes, positions=positions)
        positions = (torch.arange(k.shape[2], device=k.device).expand(k.shape[0], -1)
                     if positions is None else positions).gather(1, out.index)
        k, v, sizes = out.k, out.v, out.sizes
    return [(rows, k, v, sizes, positions)]


def _compress_layer(plan: _Plan, stages, query, key, value, scale) -> List[_Merged]:
    merged = []
    for group in plan.groups:
        # (G, N, H, D) -> (G, H, N, D): advanced indexing on dims 0 and 2 moves them to the front.
        k = key[group.rows[:, None], :, group.vision].transpose(1, 2)
        v = value[group.rows[:, None], :, group.vision].transpose(1, 2)
        text = query[group.rows[:, None], :, group.text].transpose(1, 2)
        for sub, k_out, v_out, s_out, pos in _run_stages(k, v, text, group.text_mask, group.grid, stages, scale):
            # Positions are grid cells, i.e. the token's index inside its image span.
            merged.append(_Merged(group.rows[sub], group.vision[sub].gather(1, pos), k_out, v_out, s_out))
    return merged


def _compact(plan: _Plan, merged: List[_Merged], key: torch.Tensor, value: torch.Tensor):
    """Cache of one layer after merging: per row the non-vision slots and the merged anchors, in
    sequence order, left-aligned and padded to the longest row. Returns keys, values, slot
    validity (B, P) and slot sizes (B, P)."""
    B, H, S, D = key.shape
    new_k, new_v = key.clone(), value.clone()
    keep = ~plan.is_vision
    slot_sizes = torch.ones(B, S, dtype=torch.int32, device=key.device)
    for part in merged:
        rows = part.rows[:, None]
        new_k.transpose(1, 2)[rows, part.slots] = part.k.transpose(1, 2)
        new_v.transpose(1, 2)[rows, part.slots] = part.v.transpose(1, 2)
        keep[rows, part.slots] = True
        slot_sizes[rows, part.slots] = part.sizes.to(torch.int32)
    length = int(keep.sum(dim=1).max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]
    valid = keep.gather(1, order) & plan.token_valid.gather(1, order)
    gather = order[:, None, :, None].expand(B, H, length, D)
    return new_k.gather(2, gather), new_v.gather(2, gather), valid, slot_sizes.gather(1, order)


# ----------------------------------------------------------------------------------------------
# The cache layer that holds a compressed prefix.

@functools.lru_cache(maxsize=None)
def _lightkv_layer_class():
    _, DynamicLayer, _ = _transformers()

    class LightKVLayer(DynamicLayer):
        """A DynamicLayer whose first ``prefix_slots`` slots hold the compressed prefill.

        ``get_seq_length`` reports the logical (uncompressed) length, so everything transformers
        derives from it (position ids, M-RoPE, mask sizes, input slicing in generate) continues
        from the uncompressed sequence.
        """

        def __init__(self, keys, values, slot_valid, slot_sizes, prefill_length):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            self.slot_valid = slot_valid    # (B, P) bool
            self.slot_sizes = slot_sizes    # (B, P) int32
            self.prefix_slots = keys.shape[-2]
            self.prefill_length = prefill_length
            # Nothing was removed and nothing masked beyond what the model's own mask knows.
            self.is_identity = prefill_length == self.prefix_slots and bool((slot_sizes == 1).all())
            self.all_valid = bool(slot_valid.all())

        def get_seq_length(self) -> int:
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                return 0
            return self.keys.shape[-2] - self.prefix_slots + self.prefill_length

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0 and self.keys.shape[-2] + tokens_to_remove < self.prefix_slots:
                raise ValueError("LightKV: cannot crop a cache into its compressed prompt")
            super().crop(tokens_to_remove)

        def reset(self) -> None:
            super().reset()
            self.prefix_slots = self.prefill_length = 0
            self.slot_valid = self.slot_sizes = None
            self.is_identity = self.all_valid = False

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self.slot_valid = self.slot_valid.repeat_interleave(repeats, dim=0)
            self.slot_sizes = self.slot_sizes.repeat_interleave(repeats, dim=0)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self.slot_valid, self.slot_sizes = self.slot_valid[indices], self.slot_sizes[indices]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            beam_idx = beam_idx.to(self.slot_valid.device)
            self.slot_valid = self.slot_valid.index_select(0, beam_idx)
            self.slot_sizes = self.slot_sizes.index_select(0, beam_idx)

        def attention_mask(self, incoming, query: torch.Tensor, key: torch.Tensor, float_mask: bool,
                           proportional: bool):
            """Mask for ``query`` over this layer's physical cache ``key``: the compressed prefix
            by its slot validity, the tokens after the prefill as the model's own mask says (its
            columns past the logical prefill), or causally when the model passed no mask. None
            when a single query may see every slot."""
            B, q_len, kv_len = query.shape[0], query.shape[-2], key.shape[-2]
            if incoming is None and q_len == 1 and self.all_valid and not proportional:
                return None  # one query over real slots only: no mask needed (keeps sdpa's fast paths)
            tail = kv_len - self.prefix_slots
            prefix = self.slot_valid[:, None, None, :].expand(B, 1, q_len, self.prefix_slots)
            if incoming is None:
                cols = torch.arange(tail, device=key.device)
                rows = torch.arange(q_len, device=key.device)[:, None] + (tail - q_len)
                tail_mask = (cols[None, :] <= rows).expand(B, 1, q_len, tail)
            else:
                if incoming.shape[-1] != self.prefill_length + tail:
                    raise RuntimeError(f"LightKV: attention mask covers {incoming.shape[-1]} keys, expected "
                                       f"{self.prefill_length + tail} (logical length)")
                tail_mask = incoming[..., self.prefill_length:].expand(B, -1, q_len, tail)
            if not float_mask and not proportional and (incoming is None or incoming.dtype == torch.bool):
                return torch.cat([prefix, tail_mask.to(torch.bool)], dim=-1)
            low = torch.finfo(query.dtype).min
            prefix_bias = torch.zeros(B, 1, 1, self.prefix_slots, dtype=query.dtype, device=key.device)
            if proportional:
                prefix_bias = prefix_bias + self.slot_sizes.float().log()[:, None, None, :].to(query.dtype)
            prefix_float = torch.where(prefix, prefix_bias, low)
            if tail_mask.dtype == torch.bool:
                zero = torch.zeros((), dtype=query.dtype, device=key.device)
                tail_float = torch.where(tail_mask, zero, low)
            else:
                tail_float = tail_mask.to(query.dtype)
            heads = max(prefix_float.shape[1], tail_float.shape[1])
            return torch.cat([prefix_float.expand(B, heads, q_len, -1), tail_float.expand(B, heads, q_len, -1)],
                             dim=-1)

    return LightKVLayer


# ----------------------------------------------------------------------------------------------
# Installing and removing the patch.

class _Patcher:
    def __init__(self, lightkv: LightKV, model):
        self.DynamicCache, self.DynamicLayer, self.registry = _transformers()
        self.LightKVLayer = _lightkv_layer_class()
        self.lightkv = lightkv
        self.model = model
        self.family = _family(model)
        self.decoder = _decoder(model)
        n_layers = len(self.decoder.layers)
        last = lightkv.stages[-1].layer
        if last >= n_layers:
            raise ValueError(f"layers: stage at decoder layer {last}, but the model has {n_layers} layers")
        self.attention_impl = self.decoder.config._attn_implementation
        if self.attention_impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"LightKV: attention implementation {self.attention_impl!r} is not supported; "
                             f"load the model with attn_implementation in {SUPPORTED_ATTENTION}")
        self.layer_of = {}
        for layer in self.decoder.layers:
            attention = layer.self_attn
            self.layer_of[attention] = attention.layer_idx
        self.handles = []
        self.call_kwargs: Optional[dict] = None
        self.cache = None
        self.plan: Optional[_Plan] = None

    # -- install / uninstall --

    def install(self):
        if self.model in _PATCHED:
            raise RuntimeError("LightKV: this model is already patched; nest no patch() contexts on one model")
        _PATCHED.add(self.model)
        impl = self.attention_impl
        if impl == "eager" and impl not in self.registry:
            # Eager attention is not in the registry: each modeling file falls back to its own
            # module-level eager_attention_forward, looked up at call time, so wrap that one.
            self.modeling = sys.modules[type(next(iter(self.layer_of))).__module__]
            self.inner = self.modeling.eager_attention_forward
            self.modeling.eager_attention_forward = self._attention
        else:
            local = self.registry._local_mapping
            self.modeling = None
            self.saved_local = (impl in local, local.get(impl))
            self.inner = self.registry[impl]
            self.registry[impl] = self._attention
        self.handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self.handles.append(self.decoder.register_forward_pre_hook(self._on_decoder_call, with_kwargs=True))

    def uninstall(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.modeling is not None:
            self.modeling.eager_attention_forward = self.inner
        else:
            had_local, previous = self.saved_local
            if had_local:
                self.registry[self.attention_impl] = previous
            else:
                del self.registry[self.attention_impl]
        self.call_kwargs = self.cache = self.plan = None
        _PATCHED.discard(self.model)

    # -- hooks --

    def _on_model_call(self, module, args, kwargs):
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        self.call_kwargs = call

    def _on_decoder_call(self, module, args, kwargs):
        call, self.call_kwargs = self.call_kwargs or {}, None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = module.config.use_cache
        if cache is None and use_cache:
            cache = self.DynamicCache(config=module.config)
            kwargs = {**kwargs, "cache": cache}
        self.cache = cache
        self.plan = None
        if cache is None:
            return args, kwargs
        if cache.get_seq_length() > 0:
            if call.get("pixel_values") is not None or call.get("mm_encoder_outputs"):
                raise ValueError("LightKV: images arrived in a call that continues a filled cache (chunked "
                                 "prefill or a multi-turn cache); LightKV compresses at the prefill of an "
                                 "empty cache only, so prefill the whole prompt at once")
            return args, kwargs
        self._check_cache(cache)
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("LightKV: the prefill call needs input_ids to locate the image tokens "
                             "(inputs_embeds alone are not supported)")
        embeds = kwargs.get("inputs_embeds")
        length = embeds.shape[1] if embeds is not None else input_ids.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            token_valid = mask.bool()
        else:
            token_valid = torch.ones(input_ids.shape[0], length, dtype=torch.bool, device=input_ids.device)
        self.plan = _make_plan(self.family, input_ids, token_valid, call, embeds)
        return args, kwargs

    def _check_cache(self, cache):
        if not isinstance(cache, self.DynamicCache):
            raise ValueError(f"LightKV: needs a DynamicCache, got {type(cache).__name__} "
                             "(static, offloaded and quantized caches are not supported)")
        if getattr(cache, "offloading", False):
            raise ValueError("LightKV: offloaded caches are not supported")
        for stage_layer in range(self.lightkv.stages[0].layer, len(self.decoder.layers)):
            kind = type(cache.layers[stage_layer]) if stage_layer < len(cache.layers) else self.DynamicLayer
            if kind not in (self.DynamicLayer, self.LightKVLayer):
                raise ValueError(f"LightKV: cache layer {stage_layer} is a {kind.__name__}; only "
                                 "full-attention DynamicLayer caches are supported")

    # -- the attention wrapper --

    def _attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        layer_idx = self.layer_of.get(module)
        if layer_idx is None or self.cache is None:
            return self.inner(module, query, key, value, attention_mask, *args, **kwargs)
        if self.plan is not None:
            out = self.inner(module, query, key, value, attention_mask, *args, **kwargs)
            stages = self.lightkv.stages_at(layer_idx)
            if stages and key.shape[-2] == self.plan.token_valid.shape[1]:
                with torch.no_grad():
                    merged = _compress_layer(self.plan, stages, query, key, value, getattr(module, "scaling", None))
                    k, v, valid, sizes = _compact(self.plan, merged, key, value)
                self.cache.layers[layer_idx] = self.LightKVLayer(k, v, valid, sizes, key.shape[-2])
            return out
        layer = self.cache.layers[layer_idx] if layer_idx < len(self.cache.layers) else None
        # An identity layer (nothing merged: all sizes 1, no slot removed) keeps the model's mask.
        if isinstance(layer, self.LightKVLayer) and layer.slot_valid is not None and not layer.is_identity:
            attention_mask = layer.attention_mask(attention_mask, query, key,
                                                  float_mask=self.attention_impl == "eager",
                                                  proportional=self.lightkv.proportional_attention)
        return self.inner(module, query, key, value, attention_mask, *args, **kwargs)


__all__ = ["LightKV", "SUPPORTED_FAMILIES", "SUPPORTED_ATTENTION"]
