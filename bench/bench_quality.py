"""Fidelity proxy: how well does a compressed vision KV cache answer held-out text queries?

    python bench/bench_quality.py [--quick] [--json PATH] [--plot PATH]

Vision tokens come from real photographs (scikit-image's bundled samples): the image is resized
to 336 x 336 px and cut into a 24 x 24 grid of 14 x 14 px patches. Each patch's features (its
standardized pixels plus a 2-D sinusoidal position code) go through a fixed, seeded random
projection into the keys and values of H heads x D dims.

A "prompt" is about one region of the image: its text queries are the region's mean feature plus
noise, through the query projection (the key projection, so that a query of a region's features
attends to that region). The prompt's queries drive the compression; HELD-OUT queries drawn the
same way for the same region (the rest of the prompt / the answer) are then evaluated. Metric:
relative L2 error (and mean cosine similarity) of their attention outputs over the compressed
cache vs the full cache, with and without proportional attention (log of each token's size added
to its logit). Queries about a different random region are reported too: the cost of
prompt-guided compression for a question the prompt did not anticipate.

All methods keep the same number of tokens:
  lightkv            prompt-weighted merge (lightkv_ext.compress with the prompt's queries)
  vision_only_merge  the same windows and matching, importance uniform per original token
  attention_topk     keep the tokens the prompt attends to most (FastV-style), drop the rest
  random_drop        keep a random subset
  pool2x2            2 x 2 average pooling of K and V (kept 0.25 only)
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import lightkv_ext

from _timing import load_pyplot, markdown_table, run_metadata, save_figure, write_json

SEED = 0
GRID = 24
PATCH = 14
HEADS = 8
HEAD_DIM = 64
POSITION_FREQUENCIES = 16  # per axis: sin and cos of 16 frequencies -> 64 position dims
POSITION_WEIGHT = 0.5  # share of a feature vector's norm given to the position code
PROMPT_TOKENS = 16
HELDOUT_QUERIES = 32
QUERY_SHARPNESS = 24.0  # default query scale: attention logits ~ sharpness * feature dot product
QUERY_NOISE = 1.0  # norm of a query's noise relative to the region's mean feature
REGION_CELLS = (3, 8)  # region height and width, in grid cells, drawn uniformly in this range
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field")
KEPT_RATIOS = (0.25, 0.5, 0.75)
HEADLINE_KEPT = 0.5
# (ratio, windows) of each compress stage reaching a kept ratio: one stage removes at most half.
SCHEDULES = {0.75: ((0.25, 2),), 0.5: ((0.5, 2),), 0.25: ((0.5, 2), (0.5, 1))}
METHODS = ("lightkv", "vision_only_merge", "attention_topk", "random_drop", "pool2x2")


def load_image(name: str) -> np.ndarray:
    """A bundled scikit-image sample as (GRID*PATCH, GRID*PATCH, 3) floats in [0, 1]."""
    try:
        import skimage.data
        import skimage.transform
    except ImportError as error:
        raise SystemExit("bench_quality needs scikit-image for its sample photographs: "
                         "pip install scikit-image") from error
    # The motorcycle photograph ships as the left view of a stereo pair.
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    side = GRID * PATCH
    return skimage.transform.resize(image[..., :3], (side, side), anti_aliasing=True).astype(np.float32)


def position_code() -> torch.Tensor:
    """(GRID*GRID, 4*POSITION_FREQUENCIES) 2-D sinusoidal code: sin/cos of row and of column."""
    cells = torch.arange(GRID, dtype=torch.float32)
    frequencies = torch.pi * 2.0 ** torch.linspace(-3, math.log2(GRID), POSITION_FREQUENCIES) / GRID
    angles = cells[:, None] * frequencies[None, :]
    axis = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (GRID, 2F)
    rows = axis[:, None, :].expand(GRID, GRID, -1)
    cols = axis[None, :, :].expand(GRID, GRID, -1)
    return torch.cat([rows, cols], dim=-1).reshape(GRID * GRID, -1)


def patch_features(image: np.ndarray) -> torch.Tensor:
    """(N, F) unit-scale features: standardized patch pixels, then the weighted position code."""
    pixels = torch.from_numpy(image).reshape(GRID, PATCH, GRID, PATCH, 3).permute(0, 2, 1, 3, 4)
    pixels = pixels.reshape(GRID * GRID, PATCH * PATCH * 3)
    pixels = (pixels - pixels.mean(0)) / (pixels.std(0) + 1e-6)
    pixels = pixels / math.sqrt(pixels.shape[1])
    positions = position_code()
    positions = POSITION_WEIGHT * positions / positions.norm(dim=-1, keepdim=True)
    return torch.cat([pixels, positions], dim=-1)


class Projections:
    """Fixed random key/query and value projections F -> HEADS x HEAD_DIM (seeded)."""

    def __init__(self, features: int, sharpness: float):
        self.sharpness = sharpness
        generator = torch.Generator().manual_seed(SEED)
        # Entries N(0, 1/HEAD_DIM): per head, <f W, g W> ~ <f, g>.
        self.key = torch.randn(features, HEADS * HEAD_DIM, generator=generator) / math.sqrt(HEAD_DIM)
        self.value = torch.randn(features, HEADS * HEAD_DIM, generator=generator) / math.sqrt(HEAD_DIM)

    @staticmethod
    def _heads(x: torch.Tensor) -> torch.Tensor:  # (n, H*D) -> (1, H, n, D)
        return x.reshape(x.shape[0], HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0).contiguous()

    def keys(self, features):
        return self._heads(features @ self.key)

    def values(self, features):
        return self._heads(features @ self.value)

    def queries(self, features):
        return self._heads(self.sharpness * math.sqrt(HEAD_DIM) * (features @ self.key))


def region_queries(features: torch.Tensor, cells: torch.Tensor, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(count, F) query features: the region's mean feature plus isotropic noise."""
    mean = features[cells].mean(0)
    noise = torch.randn(count, features.shape[1], generator=generator)
    noise = noise / math.sqrt(features.shape[1]) * QUERY_NOISE * mean.norm()
    return mean + noise


def random_region(generator: torch.Generator) -> torch.Tensor:
    """Token indices of a random axis-aligned rectangle of the grid."""
    low, high = REGION_CELLS
    height, width = (int(torch.randint(low, high + 1, (1,), generator=generator)) for _ in range(2))
    top = int(torch.randint(0, GRID - height + 1, (1,), generator=generator))
    left = int(torch.randint(0, GRID - width + 1, (1,), generator=generator))
    rows = torch.arange(top, top + height)
    cols = torch.arange(left, left + width)
    return (rows[:, None] * GRID + cols[None, :]).reshape(-1)


def attention(queries, k, v, sizes: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-head softmax attention (1, H, T, D); sizes adds log(size) to the logits."""
    logits = queries @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    if sizes is not None:
        logits = logits + sizes.float().log()[:, None, None, :]
    return logits.softmax(-1) @ v


def merge_stages(k, v, text, kept_ratio: float, prompt_weighted: bool):
    """Multi-stage LightKV merge reaching kept_ratio; later stages stay on the original grid."""
    sizes = positions = None
    for ratio, windows in SCHEDULES[kept_ratio]:
        # vision-only: each current token weighs as many original tokens as it stands for.
        importance = None if prompt_weighted else (
            torch.ones(k.shape[:1] + k.shape[2:3]) if sizes is None else sizes.float())
        out = lightkv_ext.compress(k, v, text, ratio=ratio, windows=windows, grid=(GRID, GRID),
                                   importance=importance, sizes=sizes, positions=positions)
        positions = out.index if positions is None else positions.gather(1, out.index)
        k, v, sizes = out.k, out.v, out.sizes
    return k, v, sizes


def keep_tokens(k, v, keep: torch.Tensor):
    keep = keep.sort().values
    return k[:, :, keep], v[:, :, keep], torch.ones(1, keep.numel(), dtype=torch.int32)


def pool2x2(k, v):
    def pool(x):  # (1, H, GRID*GRID, D) -> (1, H, GRID*GRID/4, D)
        grid = x.reshape(1, HEADS, GRID // 2, 2, GRID // 2, 2, HEAD_DIM)
        return grid.mean(dim=(3, 5)).reshape(1, HEADS, -1, HEAD_DIM)

    return pool(k), pool(v), torch.full((1, GRID * GRID // 4), 4, dtype=torch.int32)


def compress_with(method: str, k, v, text, kept_ratio: float, generator: torch.Generator):
    """(k, v, sizes) of the cache kept by `method`, or None where it has no such ratio."""
    kept = round(kept_ratio * GRID * GRID)
    if method == "lightkv":
        return merge_stages(k, v, text, kept_ratio, prompt_weighted=True)
    if method == "vision_only_merge":
        return merge_stages(k, v, text, kept_ratio, prompt_weighted=False)
    if method == "attention_topk":
        importance = lightkv_ext.score(k, text)[0]
        return keep_tokens(k, v, importance.topk(kept).indices)
    if method == "random_drop":
        return keep_tokens(k, v, torch.randperm(GRID * GRID, generator=generator)[:kept])
    if method == "pool2x2":
        return pool2x2(k, v) if kept_ratio == 0.25 else None
    raise ValueError(f"unknown method {method!r}")


def errors(reference: torch.Tensor, approximation: torch.Tensor) -> Tuple[float, float]:
    """(relative L2 error over all heads and queries, mean cosine similarity per output vector)."""
    relative = float((approximation - reference).norm() / reference.norm())
    cosine = float(torch.nn.functional.cosine_similarity(approximation, reference, dim=-1).mean())
    return relative, cosine


def evaluate(image_names: Sequence[str], prompts_per_image: int, sharpness: float) -> Tuple[List[dict], dict]:
    """One record per (image, prompt, method, kept ratio, proportional) and prompt diagnostics."""
    generator = torch.Generator().manual_seed(SEED)
    records = []
    region_mass = []
    projections = None
    for image_name in image_names:
        features = patch_features(load_image(image_name))
        projections = projections or Projections(features.shape[1], sharpness)
        k, v = projections.keys(features), projections.values(features)
        for prompt in range(prompts_per_image):
            region = random_region(generator)
            text = projections.queries(region_queries(features, region, PROMPT_TOKENS, generator))
            heldout = projections.queries(region_queries(features, region, HELDOUT_QUERIES, generator))
            other = projections.queries(region_queries(features, random_region(generator), HELDOUT_QUERIES,
                                                       generator))
            region_mass.append(float(lightkv_ext.score(k, heldout)[0, region].sum()))
            full_heldout, full_other = attention(heldout, k, v, None), attention(other, k, v, None)
            for kept_ratio in KEPT_RATIOS:
                for method in METHODS:
                    compressed = compress_with(method, k, v, text, kept_ratio, generator)
                    if compressed is None:
                        continue
                    k_c, v_c, sizes = compressed
                    assert k_c.shape[2] == round(kept_ratio * GRID * GRID), (method, k_c.shape)
                    for proportional in (True, False):
                        bias = sizes if proportional else None
                        rel, cos = errors(full_heldout, attention(heldout, k_c, v_c, bias))
                        rel_other, _ = errors(full_other, attention(other, k_c, v_c, bias))
                        records.append({"image": image_name, "prompt": prompt, "method": method,
                                        "kept_ratio": kept_ratio, "proportional": proportional,
                                        "rel_l2": rel, "cosine": cos, "other_region_rel_l2": rel_other})
        print(f"done: {image_name}", file=sys.stderr, flush=True)
    diagnostics = {"heldout_attention_mass_on_region_mean": float(np.mean(region_mass))}
    return records, diagnostics


def summarize(records: Sequence[dict]) -> List[dict]:
    """Mean/std over prompts per (kept ratio, method, proportional), plus paired win rates."""
    keyed: Dict[Tuple, List[dict]] = {}
    for record in records:
        keyed.setdefault((record["kept_ratio"], record["method"], record["proportional"]), []).append(record)
    table = []
    for (kept_ratio, method, proportional), group in sorted(keyed.items(), key=lambda item: (
            item[0][0], not item[0][2], METHODS.index(item[0][1]))):
        rel = np.array([r["rel_l2"] for r in group])
        row = {"kept_ratio": kept_ratio, "method": method, "proportional": proportional,
               "rel_l2_mean": float(rel.mean()), "rel_l2_std": float(rel.std()),
               "cosine_mean": float(np.mean([r["cosine"] for r in group])),
               "other_region_rel_l2_mean": float(np.mean([r["other_region_rel_l2"] for r in group])),
               "trials": len(group)}
        # Paired: fraction of prompts where lightkv's error is below this method's.
        rivals = keyed.get((kept_ratio, "lightkv", proportional))
        if method != "lightkv" and rivals:
            row["lightkv_wins"] = float(np.mean([a["rel_l2"] < b["rel_l2"] for a, b in zip(rivals, group)]))
        table.append(row)
    return table


def render_table(table: Sequence[dict]) -> str:
    headers = ["kept", "proportional attn", "method", "rel. L2 error (mean ± std)", "cosine",
               "other-region rel. L2", "lightkv better on"]
    body = [[row["kept_ratio"], "yes" if row["proportional"] else "no", row["method"],
             f"{row['rel_l2_mean']:.4f} ± {row['rel_l2_std']:.4f}", f"{row['cosine_mean']:.4f}",
             f"{row['other_region_rel_l2_mean']:.4f}",
             "-" if "lightkv_wins" not in row else f"{100 * row['lightkv_wins']:.0f}% of prompts"]
            for row in table]
    return markdown_table(headers, body)


def plot(table: Sequence[dict], path: str) -> bool:
    pyplot = load_pyplot()
    if pyplot is None:
        return False
    # Rows: the prompt's own region (held out) / a region the prompt did not ask about.
    figure, panels = pyplot.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey=True)
    for panel_row, (key, queries) in zip(panels, (("rel_l2_mean", "held-out queries, prompt's region"),
                                                  ("other_region_rel_l2_mean", "queries about another region"))):
        for panel, proportional in zip(panel_row, (True, False)):
            for method in METHODS:
                points = sorted((row["kept_ratio"], row[key]) for row in table
                                if row["method"] == method and row["proportional"] == proportional)
                if points:
                    panel.plot(*zip(*points), marker="o", label=method)
            panel.set_title(f"{queries}; proportional attention {'on' if proportional else 'off'}", fontsize=9)
            panel.set_yscale("log")
            panel.grid(True, which="both", alpha=0.3)
        panel_row[0].set_ylabel("relative L2 error of attention output")
    for panel in panels[1]:
        panel.set_xlabel("kept ratio of vision tokens")
    panels[0][0].legend(fontsize=8)
    figure.suptitle("Fidelity proxy on scikit-image photographs (24x24 patches)", fontsize=10)
    return save_figure(pyplot, figure, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 images x 2 prompts instead of 6 x 8")
    parser.add_argument("--json", metavar="PATH", help="write the headline and the full table as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of error vs kept ratio per method")
    parser.add_argument("--images", nargs="+", choices=IMAGES, help="sample photographs to use")
    parser.add_argument("--prompts", type=int, help="prompts (regions) per image")
    parser.add_argument("--sharpness", type=float, default=QUERY_SHARPNESS,
                        help="query scale (attention logits ~ sharpness * feature dot product)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    images = args.images or (IMAGES[:2] if args.quick else IMAGES)
    prompts = args.prompts or (2 if args.quick else 8)
    if prompts < 1:
        raise SystemExit(f"--prompts must be >= 1, got {prompts}")
    if not args.sharpness > 0:
        raise SystemExit(f"--sharpness must be > 0, got {args.sharpness}")
    torch.manual_seed(SEED)
    records, diagnostics = evaluate(images, prompts, args.sharpness)
    table = summarize(records)

    metadata = run_metadata(torch.device("cpu"))
    config = {"images": list(images), "prompts_per_image": prompts, "grid": [GRID, GRID], "patch_px": PATCH,
              "heads": HEADS, "head_dim": HEAD_DIM, "prompt_tokens": PROMPT_TOKENS,
              "heldout_queries": HELDOUT_QUERIES, "query_sharpness": args.sharpness,
              "query_noise": QUERY_NOISE, "region_cells": list(REGION_CELLS),
              "schedules": {str(kept): [list(stage) for stage in stages] for kept, stages in SCHEDULES.items()},
              "seed": SEED}
    headline = {row["method"]: row["rel_l2_mean"] for row in table
                if row["kept_ratio"] == HEADLINE_KEPT and row["proportional"]}
    print(f"- {metadata['date']}; torch {metadata['torch']}; command: `{metadata['command']}`\n"
          f"- {len(images)} images x {prompts} prompts, query sharpness {args.sharpness}; held-out queries "
          f"put {diagnostics['heldout_attention_mass_on_region_mean']:.2f} of their attention on the prompt's "
          "region (mean)\n")
    print(render_table(table))
    result = dict(metadata, kept_ratio=HEADLINE_KEPT, metric="relative L2 error of held-out queries' "
                  "attention outputs, proportional attention on", methods=headline, table=table,
                  diagnostics=diagnostics, config=config)
    if args.json:
        write_json(args.json, result)
    if args.plot and plot(table, args.plot):
        print(f"\nplot written to {args.plot}")
    return result


if __name__ == "__main__":
    main()
