"""Engine vs the naive path (the official way: one prompt at a time, image re-encoded per prompt).

Same model, images, boxes and prompts for both; answers forced to a fixed length so both paths do
the same work. For each number of regions per image (one prompt per region): a warm-up of both
paths, then ``--repeats`` timed runs of each, reported as the median and the spread (min-max) of
regions/s, ``engine/naive: <ratio>x regions/s`` (ratio of the medians), ``identical token ids:
<n>/<n> prompts`` (engine vs naive, prompt by prompt) and ``kv cache: <peak> MiB peak for <rows>
rows (copied prefix: <MiB> MiB)``: the engine's largest KV cache (each image's prefix once, each
row its own question and answer), beside what copying the prefix into each of those rows would
hold.

    python -m benchmarks.engine --preset demo --images 8 --regions 5 16 20 50    # CPU, fp32
    python -m benchmarks.engine --preset gpt4roi-7b --device cuda --dtype float16 --images 16 \\
        --regions 5 20 50 --naive-images 1 --naive-prompts 8 --kv-gib 40         # GPU (benchmarks/gpu.sh)

Needs only torch, torchvision, transformers, numpy and pillow (runs from a source checkout).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import random_init, random_init_on_device
from model.config import get_preset
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


def run_naive(loaded, jobs, tokens: int, device: str, max_prompts: int | None = None):
    """The naive path over ``jobs`` (at most ``max_prompts`` prompts of each) -> (answers, seconds)."""
    sync(device)
    t = time.perf_counter()
    out = [[generate_reference(loaded.model, loaded.tokenizer, j.image, torch.as_tensor(j.boxes)[list(p.regions)],
                               build_prompt(p.question), max_new_tokens=tokens, min_new_tokens=tokens)
            for p in j.prompts[:max_prompts]] for j in jobs]
    sync(device)
    return out, time.perf_counter() - t


def run_engine(loaded, jobs, cfg: EngineConfig, device: str):
    engine = RegionEngine(loaded, cfg)
    sync(device)
    t = time.perf_counter()
    out = engine.run(jobs)
    sync(device)
    return out, time.perf_counter() - t, engine


def timed(name: str, run, repeats: int, device: str) -> dict:
    """``repeats`` runs of ``run() -> (answers, seconds, ...)``: the answers of the last, the median
    and spread of regions/s and tokens/s, and the peak memory of the runs."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        out, s, *rest = run()
        seconds.append(s)
    regions = sum(len(row) for row in out)
    tokens = sum(len(g.token_ids) for row in out for g in row)
    med = statistics.median(seconds)
    r = {"path": name, "regions": regions, "tokens": tokens, "repeats": repeats, "seconds": seconds,
         "median_s": med, "regions_per_s": regions / med, "regions_per_s_min": regions / max(seconds),
         "regions_per_s_max": regions / min(seconds), "tokens_per_s": tokens / med, "peak_memory": peak_memory(device),
         "answers": out, "extra": rest}
    print(f"{name:>6}: {regions} regions, {tokens} tokens: {r['regions_per_s']:.2f} regions/s "
          f"(median of {repeats}; {r['regions_per_s_min']:.2f}-{r['regions_per_s_max']:.2f}), "
          f"{r['tokens_per_s']:.1f} tokens/s; peak memory {r['peak_memory']}")
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
    ap.add_argument("--images", type=int, default=4, help="images the engine gets")
    ap.add_argument("--regions", type=int, nargs="+", default=[5, 20, 50], help="regions (= prompts) per image")
    ap.add_argument("--naive-images", type=int, default=None, help="run the naive path on the first N images only")
    ap.add_argument("--naive-prompts", type=int, default=None,
                    help="and on the first N prompts of each (its cost per prompt does not depend on the others)")
    ap.add_argument("--tokens", type=int, default=32, help="forced answer length")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (after a warm-up)")
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
    if device.startswith("cuda") or get_preset(args.preset).tokenizer != "builtin":
        loaded = random_init_on_device(args.preset, device=device, dtype=dtype)
    else:
        loaded = random_init(args.preset, device=device, dtype=dtype)
    machine = (torch.cuda.get_device_name() if device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{args.preset} on {device} ({dtype}), random weights, built in {time.perf_counter() - t:.1f} s; "
          f"{machine}, torch {torch.__version__}")
    cfg = EngineConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, max_prompts=args.max_prompts,
                       kv_cache_gib=args.kv_gib)
    warm = make_jobs(1, 2, seed=1)  # every kernel and allocation path once, before anything is timed
    run_engine(loaded, warm, cfg, device)
    run_naive(loaded, warm, 2, device)

    results = []
    for n_regions in args.regions:
        jobs = make_jobs(args.images, n_regions, seed=0)
        naive_jobs = jobs[: args.naive_images or len(jobs)]
        print(f"\n{n_regions} regions per image: engine {len(jobs)} images, naive {len(naive_jobs)} images"
              + (f" x {min(args.naive_prompts, n_regions)} prompts" if args.naive_prompts else ""))
        naive = timed("naive", lambda: run_naive(loaded, naive_jobs, args.tokens, device, args.naive_prompts),
                      args.repeats, device)
        engine = timed("engine", lambda: run_engine(loaded, jobs, cfg, device), args.repeats, device)
        compared = [(a.token_ids, b.token_ids) for ra, rb in zip(naive["answers"], engine["answers"])
                    for a, b in zip(ra, rb)]
        same = sum(a == b for a, b in compared)
        ratio = engine["regions_per_s"] / naive["regions_per_s"]
        eng = engine["extra"][0]
        rows, prefix, prefix_images = eng.peak_kv_batch
        copied = rows * prefix * eng.kv_bytes_per_token  # the prefix copied into every row
        own = eng.peak_kv_bytes - prefix_images * prefix * eng.kv_bytes_per_token  # the rows' own tokens
        print(f"engine/naive: {ratio:.1f}x regions/s")
        print(f"identical token ids: {same}/{len(compared)} prompts")
        print(f"kv cache: {eng.peak_kv_bytes / 2**20:.1f} MiB peak for {rows} rows (copied prefix: "
              f"{copied / 2**20:.1f} MiB; copied prefix + the rows' own tokens: {(copied + own) / 2**20:.1f} MiB, "
              f"{(copied + own) / eng.peak_kv_bytes:.1f}x the peak)")
        if device.startswith("cuda"):
            bandwidth_report(loaded, device, naive, engine, args.tokens, rows)
        strip = ("answers", "extra")
        results.append({"regions_per_image": n_regions, "naive": {k: v for k, v in naive.items() if k not in strip},
                        "engine": {k: v for k, v in engine.items() if k not in strip}, "ratio": ratio,
                        "identical": same, "compared": len(compared), "kv_peak_bytes": eng.peak_kv_bytes,
                        "kv_rows": rows, "prefix_tokens": prefix, "copied_prefix_bytes": copied,
                        "copying_design_bytes": copied + own})
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "device": device, "machine": machine,
                                         "dtype": str(dtype), "images": args.images, "tokens": args.tokens,
                                         "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
