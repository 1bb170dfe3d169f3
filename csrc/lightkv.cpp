// Operator declarations of lightkv_ext. Each op is declared once here and implemented per
// backend in csrc/cpu (CPU key) and csrc/cuda (CUDA key); fake kernels live in
// lightkv_ext/ops.py so the ops trace under torch.compile.
//
// Both ops work on one "segmented" layout that covers the dense and the packed (varlen) API:
//   * token tensors are 4-D (B, H, L, D) with arbitrary strides. Dense input is passed as is;
//     a packed (total_N, H, D) tensor is passed as packed.permute(1, 0, 2).unsqueeze(0),
//     i.e. B = 1, L = total_N, without a copy.
//   * a token is addressed by its flat id g = b * L + l (b = g / L, l = g % L).
//
// score(k, text, images, text_mask, sizes, scale, text_rows=-1) -> importance (B, L) float32
//   k:         (B, H_kv, L, D) float32/float16/bfloat16.
//   text:      (B, H_q, S, D) same dtype, H_q % H_kv == 0, query head h reads KV head h / (H_q/H_kv).
//   images:    (I, 5) int64 on k's device, one row per image:
//              [batch_row, vis_start, vis_len, text_start, text_len]. The image's vision tokens
//              are l in [vis_start, vis_start + vis_len) of batch_row, its text tokens are
//              s in [text_start, text_start + text_len) of the same batch_row. The images'
//              vision tokens must not overlap: the CPU op raises; the CUDA op cannot check a
//              device table without a sync, so it stays in bounds but its result is then undefined.
//   text_mask: optional (B, S) bool; a text token counts only where it is True.
//   sizes:     optional (B, L) int32; when given, log(sizes) is added to every logit.
//   text_rows: the text rows all images score together, sum of text_len (any larger bound will
//              do, like flash-attn's max_seqlen), or -1 when unknown. It sizes the softmax
//              statistics: the CUDA backend takes it as given, without reading the table back
//              (with -1 it bounds it by I * S and, where that bound is large, reads the table back
//              once); the CPU backend raises when it is smaller than the table's sum. A CUDA call
//              given too small a value stays in bounds, but its result is then undefined.
//   For every image, query head h and counted text token t:
//     p = softmax over the image's vision tokens i of (scale * <text[b,h,t], k[b,h/g,i]> + log size_i)
//   importance_i = sum_h sum_t p / (H_q * T_img), T_img the counted text tokens of the image;
//   T_img == 0 gives 1 / vis_len. Tokens of no image get 0. Accumulation in float32.
//
// merge(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window,
//       token_major, local_bases=None)
//   -> (k_out, v_out, sizes_out, index, assignment)
//   k, v:           (B, H_kv, L, D), same shape and dtype (any strides).
//   metric:         (B, L, G, C) any float dtype, any strides; the similarity vector of token
//                   (b, l) is metric[b, l] flattened (G * C values). Default metric of the API is
//                   k.permute(0, 2, 1, 3), i.e. all KV heads' keys concatenated.
//   importance:     (B, L) float32, the merge weights.
//   sizes:          (B, L) int32, original tokens each input token stands for.
//   window_tokens:  (total,) int64 flat token ids, grouped by window; inside a window in
//                   increasing l (raster order). Every token of every row appears exactly once.
//   window_offsets: (W + 1,) int64, window w is window_tokens[offsets[w] : offsets[w + 1]];
//                   all tokens of one window share one batch row; windows may be empty.
//   ratio:          double in [0, 1); per window of n tokens r = min(floor(ratio*n + 1e-6), n/2)
//                   computed in double.
//   kept:           M, the number of kept tokens per batch row (same for every row; the caller
//                   derives it from the window sizes).
//   max_window:     the largest window's token count, or any larger bound (like flash-attn's
//                   max_seqlen, so that the CUDA backend picks its kernels without reading the
//                   offsets back). The CPU backend raises when a window is larger; the CUDA
//                   backend cannot check without a sync and leaves such a window unmerged when
//                   the bound picked its exact mode (bounds up to 512, see cuda/merge.cu).
//   token_major:    when true k_out / v_out are allocated (B, M, H, D) contiguous and returned as
//                   the (B, H, M, D) permuted view (for the packed API); else (B, H, M, D)
//                   contiguous.
//   local_bases:    optional (2, B, L) int64, for a row that packs several images: per token, the
//                   first l of its image (plane 0) and the first output slot of its image (plane
//                   1), subtracted from the index and assignment entries of the token, so that
//                   they count from the image's start (the packed API's per-image numbers). The
//                   caller derives it from the image bounds; the CUDA backend trusts it.
//   Matching per window (positions p = 0..n-1 in window order): src = even p, dst = odd p;
//   similarity = <a, b> / (|a| |b| + 1e-8), accumulated in float64 so that every backend takes
//   bit-identical decisions; each src picks the dst of largest similarity (ties: lowest dst p);
//   srcs ranked by that score, highest first (ties: lower src p); the first r are merged.
//   Outputs, per batch row, kept tokens (unmerged srcs and all dsts) in increasing l:
//     k_out/v_out (B, H, M, D) input dtype: weighted average (weights = importance, float32
//                 accumulation) of a dst and its merged srcs; a token with no merged srcs is
//                 copied bitwise; a group of total weight 0 uses equal weights.
//     sizes_out   (B, M) int32: sum of the group's sizes.
//     index       (B, M) int64: l of each kept token (minus local_bases[0, b, l]).
//     assignment  (B, L) int64: output slot m of the group each input token ended in (minus
//                 local_bases[1, b, l]).
//
// compress(k, v, text, images, text_mask, sizes, scale, metric, window_tokens, window_offsets,
//          ratio, kept, max_window, token_major, text_rows=-1, local_bases=None)
//   -> (k_out, v_out, sizes_out, index, assignment, importance)
//   importance = score(k, text, images, text_mask, sizes, scale, text_rows), then
//   merge(k, v, metric, importance, sizes, window_tokens, window_offsets, ratio, kept, max_window,
//   token_major, local_bases): one call for the common case (the API's compress without a given
//   importance).
//   `sizes` is required and always biases the logits; unit sizes add log 1 = 0, exactly as no
//   sizes. The CUDA backend runs the merge decisions, which do not depend on the importance, on a
//   second stream while it scores (LIGHTKV_OVERLAP=0: both on the current stream).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lightkv_ext._C` loads this library, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lightkv, m) {
  m.def("score(Tensor k, Tensor text, Tensor images, Tensor? text_mask, Tensor? sizes, "
        "float scale, SymInt text_rows=-1) -> Tensor");
  m.def("merge(Tensor k, Tensor v, Tensor metric, Tensor importance, Tensor sizes, "
        "Tensor window_tokens, Tensor window_offsets, float ratio, SymInt kept, int max_window, "
        "bool token_major, Tensor? local_bases=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("compress(Tensor k, Tensor v, Tensor text, Tensor images, Tensor? text_mask, Tensor sizes, "
        "float scale, Tensor metric, Tensor window_tokens, Tensor window_offsets, float ratio, SymInt kept, "
        "int max_window, bool token_major, SymInt text_rows=-1, Tensor? local_bases=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
