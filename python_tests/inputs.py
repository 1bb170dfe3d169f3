"""Random dense inputs shared by the test files."""
import torch


def make_inputs(B=2, H_kv=2, group=2, N=16, T=5, D=8, dtype=torch.float32, seed=0):
    """k, v: (B, H_kv, N, D) and text queries (B, H_kv * group, T, D), seeded."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H_kv, N, D, generator=gen).to(dtype)
    v = torch.randn(B, H_kv, N, D, generator=gen).to(dtype)
    text = torch.randn(B, H_kv * group, T, D, generator=gen).to(dtype)
    return k, v, text


def cancelling_keys(k):
    """k with a large first and last feature per head, the last one's sign flipped on the dsts (odd
    window positions of 2 x 12-token windows): each src-dst product cancels two terms that the
    float32 sums of 16-bit tensor cores round, so their screened cosines are far off and near-tied,
    and only the float64 recheck decides as the reference does."""
    big = 2.0**14 if k.dtype == torch.bfloat16 else 2.0**7
    keys = 6 * k.float()
    keys[..., 0] = big
    keys[:, :, 0::2, -1] = big
    keys[:, :, 1::2, -1] = -big
    return keys.to(k.dtype)
