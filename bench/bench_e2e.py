"""End-to-end LightKV on Hugging Face models: prefill latency, decode throughput, peak memory and
KV-cache bytes, with and without ``lightkv_ext.hf.LightKV``.

Prefill = generate() start to the first token's logits (vision encoder included); decode = mean
time per later step (timestamped by a logits processor), median over ``--repeats`` runs.

Weights are random (speed and memory do not depend on them); ``min_new_tokens`` forces every run
to decode the same number of tokens. Models: LLaVA-1.5-7B shapes (Llama-2-7B + CLIP ViT-L/14-336,
576 image tokens) and Qwen2.5-VL-7B shapes (a 448x448 image: 256 tokens after the 2x2 merge).

    python bench/bench_e2e.py                       # CUDA, 7B shapes, batch 1 and 16
    python bench/bench_e2e.py --quick --device cpu  # scaled-down shapes, a couple of minutes
    python bench/bench_e2e.py --quick --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time

import torch
import transformers

import lightkv_ext
from lightkv_ext.hf import LightKV

IMAGE_TOKEN = 32000  # an id inside every vocabulary used here, never sampled (min_new_tokens only bans EOS)


def llava_config(quick: bool):
    if quick:
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
    else:  # Llama-2-7B + CLIP ViT-L/14-336
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    text_config = transformers.LlamaConfig(vocab_size=32064, max_position_embeddings=4096, pad_token_id=0,
                                           **text)
    vision_config = transformers.CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **vision)
    return transformers.LlavaConfig(vision_config=vision_config, text_config=text_config,
                                    image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                                    vision_feature_select_strategy="default")


def qwen25_config(quick: bool):
    if quick:
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2)
        vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1])
    else:  # Qwen2.5-VL-7B
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # 16/24/24 of 64 at 7B size
    text_config = dict(vocab_size=152064, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": section}, **text)
    vision_config = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                         window_size=112, out_hidden_size=text["hidden_size"], **vision)
    return transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                                         image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
                                         vision_start_token_id=IMAGE_TOKEN + 2, vision_end_token_id=IMAGE_TOKEN + 3)


def llava_inputs(config, batch, question, device, dtype):
    side = config.vision_config.image_size // config.vision_config.patch_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (batch, 8 + question), generator=gen)
    ids = torch.cat([prompt[:, :8], torch.full((batch, side * side), IMAGE_TOKEN), prompt[:, 8:]], dim=1)
    pixels = torch.randn(batch, 3, 336, 336, generator=gen)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                pixel_values=pixels.to(device, dtype))


def qwen_inputs(config, batch, question, device, dtype):
    patches_h = patches_w = 32  # 448x448 pixels, 14x14 patches
    tokens = patches_h * patches_w // 4
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (batch, 8 + question), generator=gen)
    image = torch.cat([torch.tensor([IMAGE_TOKEN + 2]), torch.full((tokens,), IMAGE_TOKEN),
                       torch.tensor([IMAGE_TOKEN + 3])])
    ids = torch.cat([prompt[:, :8], image.expand(batch, -1), prompt[:, 8:]], dim=1)
    pixels = torch.randn(batch * patches_h * patches_w, 3 * 2 * 14 * 14, generator=gen)
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                pixel_values=pixels.to(device, dtype),
                image_grid_thw=torch.tensor([[1, patches_h, patches_w]] * batch, device=device),
                mm_token_type_ids=(ids == IMAGE_TOKEN).int().to(device))


MODELS = {
    "llava-1.5-7b": (llava_config, transformers.LlavaForConditionalGeneration, llava_inputs),
    "qwen2.5-vl-7b": (qwen25_config, transformers.Qwen2_5_VLForConditionalGeneration, qwen_inputs),
}


def schedule(n_layers: int) -> LightKV:
    """The paper's 3-stage schedule (layers 12/18/24 of 32) scaled to the model's depth."""
    layers = tuple(round(n_layers * fraction) for fraction in (12 / 32, 18 / 32, 24 / 32))
    return LightKV(layers=layers, windows=(4, 2, 1), ratios=(0.5, 0.5, 0.5))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(transformers.LogitsProcessor):
    """Timestamps every generation step (called once per forward, right after it)."""

    def __init__(self, device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, inputs, new_tokens, device):
    """Prefill seconds (to the first token's logits), seconds per decode step and KV-cache bytes
    of one run (the output is dropped, so it does not weigh on the next run's peak memory)."""
    clock = StepClock(device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         logits_processor=transformers.LogitsProcessorList([clock]), return_dict_in_generate=True)
    sync(device)
    prefill = clock.stamps[0] - start
    per_step = (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)
    return prefill, per_step, kv_bytes(out.cache)


def kv_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure(model, lightkv, inputs, new_tokens, repeats, device):
    """Baseline and LightKV runs alternate (so load drifts hit both alike); medians over
    ``repeats`` runs each, after one warm-up run each."""
    runs = {"baseline": [], "lightkv": []}
    peaks = {}
    for repeat in range(repeats + 1):
        for name in runs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with lightkv.patch(model) if name == "lightkv" else contextlib.nullcontext():
                result = timed_generate(model, inputs, new_tokens if repeat else 2, device)
            if repeat:
                runs[name].append(result)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    batch = inputs["input_ids"].shape[0]
    return {name: {
        "prefill_ms": median([prefill for prefill, _, _ in results]) * 1e3,
        "decode_tokens_per_s": batch / median([step for _, step, _ in results]),
        "peak_memory_mib": peaks[name] / 2**20 if device.type == "cuda" else None,
        "kv_mib": results[-1][2] / 2**20,
    } for name, results in runs.items()}


def run(args):
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    results = []
    for name in args.models:
        make_config, model_class, make_inputs = MODELS[name]
        config = make_config(args.quick)
        config._attn_implementation = args.attn
        torch.manual_seed(0)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = model_class(config).eval()
        finally:
            torch.set_default_dtype(previous_dtype)
        lightkv = schedule(config.text_config.num_hidden_layers)
        for batch in args.batch:
            inputs = make_inputs(config, batch, args.question_tokens, device, dtype)
            with torch.inference_mode():
                measured = measure(model, lightkv, inputs, args.new_tokens, args.repeats, device)
            row = dict(model=name, batch=batch, prompt_tokens=inputs["input_ids"].shape[1],
                       stages=[(s.layer, s.windows, s.ratio) for s in lightkv.stages], **measured)
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def environment(args):
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightkv_ext": lightkv_ext.__version__,
        "python": platform.python_version(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "quick": args.quick,
        "new_tokens": args.new_tokens,
        "question_tokens": args.question_tokens,
    }


def markdown(env, results):
    lines = [f"# LightKV end-to-end ({'quick, scaled-down shapes' if env['quick'] else '7B shapes'})", ""]
    lines += [f"- {key}: `{value}`" for key, value in env.items()]
    cores = os.cpu_count() or 1
    load = max(env["load_average_1m_at_start"], env.get("load_average_1m_at_end", 0.0))
    if load > cores:
        lines += ["", f"**The machine was oversubscribed (load average up to {load:.0f} on {cores} cores): "
                  "the timing columns are noise; the KV columns are exact.**"]
    lines += ["", "| model | batch | prompt | stages (layer, windows, ratio) | prefill ms (base / LightKV) "
              "| decode tok/s (base / LightKV) | peak MiB (base / LightKV) | KV MiB (base / LightKV) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, c = r["baseline"], r["lightkv"]
        peak = ("n/a" if b["peak_memory_mib"] is None
                else f"{b['peak_memory_mib']:.0f} / {c['peak_memory_mib']:.0f}")
        stages = ", ".join(f"({layer}, {win[0]}x{win[1]}, {ratio})" for layer, win, ratio in r["stages"])
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt_tokens']} | {stages} "
                     f"| {b['prefill_ms']:.1f} / {c['prefill_ms']:.1f} "
                     f"| {b['decode_tokens_per_s']:.1f} / {c['decode_tokens_per_s']:.1f} "
                     f"| {peak} | {b['kv_mib']:.2f} / {c['kv_mib']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes (for CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="default: 1 16 (quick: 1 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 (quick: 16)")
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3")
    parser.add_argument("--json", help="write environment and results here")
    parser.add_argument("--markdown", help="write a markdown table here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    args.batch = args.batch or ([1, 4] if args.quick else [1, 16])
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or 3
    if args.new_tokens < 2:
        parser.error("--new-tokens: need at least 2 to separate decoding from prefill")
    env = environment(args)
    results = run(args)
    env["load_average_1m_at_end"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(env, results))


if __name__ == "__main__":
    main()
