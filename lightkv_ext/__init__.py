"""lightkv_ext: LightKV, prompt-guided merging of vision tokens in the KV cache of LVLMs.

``compress`` / ``compress_varlen`` / ``score`` run the native CPU or CUDA kernels;
``lightkv_ext.reference`` is the pure-PyTorch oracle of the same semantics.
"""
from . import reference
from .api import compress, compress_varlen, score
from .types import Compressed, CompressedVarlen

__all__ = ["compress", "compress_varlen", "score", "Compressed", "CompressedVarlen", "reference"]
__version__ = "0.1.0"
