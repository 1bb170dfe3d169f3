"""Random dense inputs shared by the test files."""
import torch


def make_inputs(B=2, H_kv=2, group=2, N=16, T=5, D=8, dtype=torch.float32, seed=0):
    """k, v: (B, H_kv, N, D) and text queries (B, H_kv * group, T, D), seeded."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H_kv, N, D, generator=gen).to(dtype)
    v = torch.randn(B, H_kv, N, D, generator=gen).to(dtype)
    text = torch.randn(B, H_kv * group, T, D, generator=gen).to(dtype)
    return k, v, text
