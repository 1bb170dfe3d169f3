"""Result types of the public API."""
from typing import NamedTuple

import torch


class Compressed(NamedTuple):
    """Result of :func:`lightkv_ext.compress`; M kept tokens per row."""

    k: torch.Tensor  #: (B, H_kv, M, D), input dtype
    v: torch.Tensor  #: (B, H_kv, M, D), input dtype
    sizes: torch.Tensor  #: (B, M) int32, original tokens each output token stands for
    index: torch.Tensor  #: (B, M) int64, input position of each output token's anchor (increasing)
    assignment: torch.Tensor  #: (B, N) int64, output row each input token ended in
    importance: torch.Tensor  #: (B, N) float32, the merge weights that were used


class CompressedVarlen(NamedTuple):
    """Result of :func:`lightkv_ext.compress_varlen`; image i owns rows cu_seqlens[i]:cu_seqlens[i+1]."""

    k: torch.Tensor  #: (total_M, H_kv, D)
    v: torch.Tensor  #: (total_M, H_kv, D)
    cu_seqlens: torch.Tensor  #: (I + 1,) int32, offsets of each image's kept tokens
    sizes: torch.Tensor  #: (total_M,) int32
    index: torch.Tensor  #: (total_M,) int64, anchor position inside its own image
    assignment: torch.Tensor  #: (total_N,) int64, output row inside its own image
    importance: torch.Tensor  #: (total_N,) float32
