"""Engine vs the naive path (the official way: one prompt at a time, image re-encoded per prompt).

Same model, images, boxes and prompts for both; answers forced to a fixed length so both paths do
the same work. Prints images/s, regions/s, generated tokens/s, peak memory and engine/naive, and
checks that the two paths generated the same tokens.

    python -m benchmarks.engine --preset tiny --images 4 --regions 16            # CPU
    python -m benchmarks.engine --preset gpt4roi-7b --device cuda --images 16 \\
        --regions 20 --naive-images 1 --kv-gib 40                               # GPU, bf16

Needs only torch, torchvision, transformers, numpy and pillow (runs from a source checkout).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import random_init, random_init_on_device
from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt
from model.generate import generate_reference
from model.prompt import build_prompt

TEMPLATES = (  # mixed lengths, one region each; every 5th prompt asks about a pair
    "Can you give a description of the region mentioned by <region1>?",
    "What is <region1>?",
    "What can you tell me about the region indicated by <region1> in the image?",
    "Could you describe the region shown as <region1> in the picture in great detail?",
)
PAIR = "What is the relationship between <region1> and <region2>?"
HBM_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039}


def make_jobs(n_images: int, n_regions: int, seed: int) -> list[ImageJob]:
    rs = np.random.RandomState(seed)
    jobs = []
    for i in range(n_images):
        h, w = rs.randint(240, 640), rs.randint(240, 640)
        image = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
        xy = rs.rand(n_regions, 2) * 0.7
        wh = 0.05 + rs.rand(n_regions, 2) * 0.25
        boxes = torch.tensor(np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1), dtype=torch.float32)
        prompts = [RegionPrompt(PAIR, (r, (r + 1) % n_regions)) if r % 5 == 4 and n_regions > 1
                   else RegionPrompt(TEMPLATES[r % len(TEMPLATES)], (r,)) for r in range(n_regions)]
        jobs.append(ImageJob(image, boxes, prompts))
    return jobs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS (peak so far)"


def run_naive(loaded, jobs, tokens: int, device: str):
    sync(device)
    t = time.perf_counter()
    out = [[generate_reference(loaded.model, loaded.tokenizer, j.image, torch.as_tensor(j.boxes)[list(p.regions)],
                               build_prompt(p.question), max_new_tokens=tokens, min_new_tokens=tokens)
            for p in j.prompts] for j in jobs]
    sync(device)
    return out, time.perf_counter() - t


def run_engine(loaded, jobs, cfg: EngineConfig, device: str):
    engine = RegionEngine(loaded, cfg)
    sync(device)
    t = time.perf_counter()
    out = engine.run(jobs)
    sync(device)
    return out, time.perf_counter() - t


def rates(name, jobs, gens, seconds) -> dict:
    regions = sum(len(j.prompts) for j in jobs)
    tokens = sum(len(g.token_ids) for row in gens for g in row)
    r = {"path": name, "images": len(jobs), "regions": regions, "seconds": round(seconds, 3),
         "images_per_s": len(jobs) / seconds, "regions_per_s": regions / seconds, "tokens_per_s": tokens / seconds}
    print(f"{name:>6}: {len(jobs)} images, {regions} regions, {tokens} tokens in {seconds:.2f} s -> "
          f"{r['images_per_s']:.2f} images/s, {r['regions_per_s']:.2f} regions/s, {r['tokens_per_s']:.1f} tokens/s")
    return r


def bandwidth_report(loaded, device: str, naive: dict, engine: dict, tokens: int, rows: int) -> None:
    name = torch.cuda.get_device_name()
    gbps = next((v for k, v in HBM_GBPS.items() if k in name), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.llm.parameters())
    if gbps is None:
        print(f"unknown HBM bandwidth for {name}; weight bytes {weight_bytes / 1e9:.2f} GB")
        return
    bound_steps = gbps * 1e9 / weight_bytes  # decode steps/s if each step only reads the weights once
    print(f"HBM bound ({name}, {gbps} GB/s, LLM weights {weight_bytes / 1e9:.2f} GB): {bound_steps:.1f} decode steps/s "
          f"= {bound_steps:.1f} tokens/s at batch 1, {bound_steps * rows:.0f} tokens/s at batch {rows} (KV reads ignored)")
    print(f"naive: {naive['tokens_per_s']:.1f} tokens/s = {naive['tokens_per_s'] / bound_steps:.0%} of the batch-1 bound "
          f"(its time includes prefill and vision per prompt)")
    print(f"engine: {engine['tokens_per_s']:.1f} tokens/s = {engine['tokens_per_s'] / (bound_steps * rows):.0%} of the "
          f"batch-{rows} weight-read bound")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--naive-images", type=int, default=None, help="run the naive path on the first N images only")
    ap.add_argument("--regions", type=int, default=16, help="regions (= prompts) per image")
    ap.add_argument("--tokens", type=int, default=32, help="forced answer length")
    ap.add_argument("--max-prompts", type=int, default=EngineConfig.max_prompts)
    ap.add_argument("--kv-gib", type=float, default=EngineConfig.kv_cache_gib, help="KV-cache budget per decode batch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True

    t = time.perf_counter()
    if device.startswith("cuda"):
        loaded = random_init_on_device(args.preset, device=device, dtype=dtype)
    else:
        loaded = random_init(args.preset, device=device, dtype=dtype)
    print(f"{args.preset} on {device} ({dtype}), random weights, built in {time.perf_counter() - t:.1f} s; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""))
    jobs = make_jobs(args.images, args.regions, seed=0)
    naive_jobs = jobs[: args.naive_images or len(jobs)]
    cfg = EngineConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, max_prompts=args.max_prompts,
                       kv_cache_gib=args.kv_gib)

    run_engine(loaded, jobs[:1], EngineConfig(max_new_tokens=2, min_new_tokens=2), device)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    naive_out, naive_s = run_naive(loaded, naive_jobs, args.tokens, device)
    naive = rates("naive", naive_jobs, naive_out, naive_s)
    print(f"        peak memory: {peak_memory(device)}")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    engine_out, engine_s = run_engine(loaded, jobs, cfg, device)
    engine = rates("engine", jobs, engine_out, engine_s)
    print(f"        peak memory: {peak_memory(device)}")

    compared = [(a.token_ids, b.token_ids) for ra, rb in zip(naive_out, engine_out) for a, b in zip(ra, rb)]
    same = sum(a == b for a, b in compared)
    print(f"identical token ids: {same}/{len(compared)} prompts")
    print(f"engine/naive: {engine['regions_per_s'] / naive['regions_per_s']:.1f}x regions/s")
    if device.startswith("cuda"):
        bandwidth_report(loaded, device, naive, engine, args.tokens, min(args.max_prompts, args.images * args.regions))
    if args.json:
        args.json.write_text(json.dumps({"naive": naive, "engine": engine, "identical": same,
                                         "compared": len(compared)}, indent=2))


if __name__ == "__main__":
    main()
