"""The native ops (declared in csrc/lightkv.cpp) and their fake kernels for torch.compile."""
import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.lightkv)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "lightkv_ext: the native extension is not built; run `pip install --no-build-isolation -e .` "
        f"in the repository ({error})") from error

score = torch.ops.lightkv.score.default
merge = torch.ops.lightkv.merge.default
compress = torch.ops.lightkv.compress.default


@torch.library.register_fake("lightkv::score")
def _score_fake(k, text, images, text_mask, sizes, scale, text_rows=-1):
    return k.new_empty((k.shape[0], k.shape[2]), dtype=torch.float32)


@torch.library.register_fake("lightkv::merge")
def _merge_fake(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window,
                token_major, local_bases=None):
    B, H, L, D = k.shape
    if token_major:
        k_out = k.new_empty((B, kept, H, D)).permute(0, 2, 1, 3)
        v_out = v.new_empty((B, kept, H, D)).permute(0, 2, 1, 3)
    else:
        k_out, v_out = k.new_empty((B, H, kept, D)), v.new_empty((B, H, kept, D))
    sizes_out = k.new_empty((B, kept), dtype=torch.int32)
    index = k.new_empty((B, kept), dtype=torch.int64)
    assignment = k.new_empty((B, L), dtype=torch.int64)
    return k_out, v_out, sizes_out, index, assignment


@torch.library.register_fake("lightkv::compress")
def _compress_fake(k, v, text, images, text_mask, sizes, scale, metric, window_tokens, window_offsets, ratio,
                   kept, max_window, token_major, text_rows=-1, local_bases=None):
    importance = _score_fake(k, text, images, text_mask, sizes, scale)
    merged = _merge_fake(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window,
                         token_major)
    return (*merged, importance)
