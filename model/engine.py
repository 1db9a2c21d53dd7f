"""The region inference engine: encode each image once, batch every region prompt, share the prefix.

The official code answers one question at a time and recomputes CLIP, the ~1 TMAC fused pyramid
and the whole prompt prefix for every question. Here, for a batch of images:

1. the vision tower, the image tokens and the fused pyramid run once per image (in chunks of
   ``max_images``), and the RoI head runs once for all boxes of all images;
2. the prompt prefix every prompt shares (system line + image tokens + preamble, up to the first
   ``<bbox>``) is prefilled once per image; its KV cache is gathered for each of the image's prompts
   (copied, not recomputed);
3. each prompt's remaining tokens are prefilled together, padded on the left of that suffix (the
   padding sits between the prefix and the suffix, masked out; positions stay contiguous), and all
   prompts of all images decode together, ``max_prompts`` / ``max_tokens`` at a time;
4. the stop string ``###`` is detected on token ids (a per-token table of '#' runs), not by
   decoding text; finished rows are dropped from the batch as it shrinks.

Greedy decoding gives the same tokens as :func:`model.generate.generate_reference`, which the tests
check prompt by prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache

from .checkpoint import Loaded
from .config import EngineConfig
from .generate import Generation, lm_forward
from .gpt4roi import ImageFeatures
from .prompt import STOP, build_prompt, cut_answer, region_order
from .vision import ImageLike, preprocess


@dataclass(frozen=True)
class RegionPrompt:
    """One question about an image. ``<regionK>`` in ``question`` is the image's box ``regions[K-1]``."""

    question: str
    regions: tuple[int, ...] = ()


@dataclass
class ImageJob:
    """An image, its boxes (n, 4) normalised xyxy, and the prompts to answer about it."""

    image: ImageLike
    boxes: torch.Tensor | Sequence[Sequence[float]]
    prompts: list[RegionPrompt] = field(default_factory=list)


@dataclass
class _Row:
    job: int
    prompt: int
    suffix: list[int]  # token ids after the shared prefix
    box_index: list[int]  # the image's box behind each <bbox> token of the prompt, in order


class StopTable:
    """Per-token facts about '#' runs, so ``###`` can be found on ids, on the device."""

    def __init__(self, texts: Sequence[str], stop: str = STOP, device=None):
        if set(stop) != {"#"}:
            raise ValueError(f"the id-level stop check handles runs of '#', not {stop!r}")
        self.need = len(stop)
        lead = [len(t) - len(t.lstrip("#")) for t in texts]
        tail = [len(t) - len(t.rstrip("#")) for t in texts]
        self.lead = torch.tensor(lead, device=device)
        self.tail = torch.tensor(tail, device=device)
        self.length = torch.tensor([len(t) for t in texts], device=device)
        self.all_hash = torch.tensor([bool(t) and set(t) == {"#"} for t in texts], device=device)
        self.inner = torch.tensor([stop in t for t in texts], device=device)

    def step(self, run: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trailing '#' count per row, new ids) -> (new count, whether the text now holds the stop)."""
        empty = self.length[ids] == 0
        hit = self.inner[ids] | (~empty & (run + self.lead[ids] >= self.need))
        run = torch.where(empty, run, torch.where(self.all_hash[ids], run + self.length[ids], self.tail[ids]))
        return run, hit | (run >= self.need)


class RegionEngine:
    def __init__(self, loaded: Loaded, config: EngineConfig = EngineConfig()):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.stops = StopTable(self.tokenizer.token_texts(), device=self.model.device)
        l = self.model.config.llm
        kv_bytes_per_token = 2 * l.num_layers * l.num_kv_heads * (l.hidden_size // l.num_heads) * self.model.dtype.itemsize
        self.max_tokens = int(config.kv_cache_gib * 2**30 // kv_bytes_per_token)

    # Public API --------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, jobs: Sequence[ImageJob]) -> list[list[Generation]]:
        """Answers for every prompt of every job, in order: ``result[j][p]``."""
        results: list[list[Generation | None]] = [[None] * len(j.prompts) for j in jobs]
        step = self.config.max_images
        for start in range(0, len(jobs), step):
            chunk = list(range(start, min(start + step, len(jobs))))
            self._run_images(jobs, chunk, results)
        return results  # type: ignore[return-value]

    # Per image chunk ---------------------------------------------------------------------------
    def _run_images(self, jobs, chunk: list[int], results) -> None:
        model = self.model
        features = model.encode_images(preprocess([jobs[j].image for j in chunk], model.config.vision))
        boxes = [torch.as_tensor(jobs[j].boxes, dtype=torch.float32).reshape(-1, 4) for j in chunk]
        region_tokens = model.region_tokens(features, [b.to(model.device) for b in boxes])

        rows, prompt_ids = [], []
        for local, j in enumerate(chunk):
            for p, prompt in enumerate(jobs[j].prompts):
                text = build_prompt(prompt.question)
                prompt_ids.append(self.tokenizer.encode(text))
                rows.append(_Row(local, p, [], self._box_index(prompt, text, len(boxes[local]), j)))
        if not rows:
            return
        prefix = self._shared_prefix(prompt_ids) if self.config.share_prefix else []
        for row, ids in zip(rows, prompt_ids):
            row.suffix = ids[len(prefix):]
        prefix_kv = self._prefill_prefix(prefix, features) if prefix else None

        for batch in self._row_batches(rows, len(prefix)):
            gens = self._decode(batch, prefix, prefix_kv, features, region_tokens)
            for row, gen in zip(batch, gens):
                results[chunk[row.job]][row.prompt] = gen

    @staticmethod
    def _box_index(prompt: RegionPrompt, text: str, n_boxes: int, job: int) -> list[int]:
        order = region_order(text)
        if any(not 1 <= k <= len(prompt.regions) for k in order):
            raise ValueError(f"job {job}: prompt {prompt.question!r} names regions {order} but maps only "
                             f"{len(prompt.regions)} ({prompt.regions})")
        index = [prompt.regions[k - 1] for k in order]
        if any(not 0 <= i < n_boxes for i in index):
            raise ValueError(f"job {job}: prompt {prompt.question!r} refers to boxes {index}, the image has {n_boxes}")
        return index

    def _shared_prefix(self, prompt_ids: list[list[int]]) -> list[int]:
        """The longest common prefix of all prompts, stopped before any <bbox> (its embedding
        differs per prompt) and before the last token of the shortest prompt (each row needs at
        least one suffix token to produce its first logits)."""
        t = self.model.config.tokens
        n = min(len(ids) for ids in prompt_ids) - 1
        first = prompt_ids[0]
        end = next((i for i in range(n) if first[i] == t.bbox_id or any(ids[i] != first[i] for ids in prompt_ids)), n)
        prefix = first[:end]
        if 0 < prefix.count(t.im_patch_id) < self.model.config.num_image_tokens:
            prefix = prefix[:prefix.index(t.im_patch_id)]  # never split the image run
        return prefix

    def _prefill_prefix(self, prefix: list[int], features: ImageFeatures) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill the shared prefix once per image -> per layer (keys, values), batch = images."""
        model = self.model
        n_images = features.image_tokens.shape[0]
        ids = torch.tensor([prefix], device=model.device).expand(n_images, -1)
        image_tokens = features.image_tokens if self._has_image(prefix) else None
        _, cache = lm_forward(model.llm, DynamicCache(), inputs_embeds=model.embed(ids, image_tokens), logits_to_keep=1)
        return _cache_tensors(cache)

    def _has_image(self, ids: list[int]) -> bool:
        return self.model.config.tokens.im_patch_id in ids

    def _row_batches(self, rows: list[_Row], prefix_len: int) -> list[list[_Row]]:
        """Rows grouped so that each group respects ``max_prompts`` and the KV-cache budget."""
        cfg = self.config
        rows = sorted(rows, key=lambda r: len(r.suffix))  # similar lengths pad less
        batches, current, longest = [], [], 0
        for row in rows:
            longest_if = max(longest, len(row.suffix))
            tokens_if = (len(current) + 1) * (prefix_len + longest_if + cfg.max_new_tokens)
            if current and (len(current) >= cfg.max_prompts or tokens_if > self.max_tokens):
                batches.append(current)
                current, longest_if = [], len(row.suffix)
            current.append(row)
            longest = longest_if
        return batches + ([current] if current else [])

    # Decoding ----------------------------------------------------------------------------------
    def _decode(self, rows: list[_Row], prefix: list[int], prefix_kv, features: ImageFeatures,
                region_tokens: list[torch.Tensor]) -> list[Generation]:
        model, device = self.model, self.model.device
        n, plen = len(rows), len(prefix)
        width = max(len(r.suffix) for r in rows)
        image_of_row = torch.tensor([r.job for r in rows], device=device)

        # Suffixes padded on their left: [prefix | pad ... pad | suffix], positions contiguous per row.
        pad = model.config.tokens.pad_id
        ids = torch.tensor([[pad] * (width - len(r.suffix)) + r.suffix for r in rows], device=device)
        real = torch.tensor([[0] * (width - len(r.suffix)) + [1] * len(r.suffix) for r in rows], device=device)
        mask = torch.cat([torch.ones(n, plen, dtype=torch.long, device=device), real], dim=1)
        positions = (plen + real.cumsum(1) - 1).clamp(min=plen)

        image_tokens = features.image_tokens[image_of_row] if self._has_image(rows[0].suffix) else None
        regions = torch.cat([region_tokens[r.job][r.box_index] for r in rows])
        embeds = model.embed(ids, image_tokens, regions if len(regions) else None)
        cache = DynamicCache()
        if prefix_kv is not None:
            for layer, (k, v) in enumerate(prefix_kv):
                cache.update(k[image_of_row], v[image_of_row], layer)
        logits, cache = lm_forward(model.llm, cache, inputs_embeds=embeds, attention_mask=mask,
                                   position_ids=positions, logits_to_keep=1)
        return self._generate(rows, logits[:, -1], cache, mask, positions[:, -1])

    def _generate(self, rows, logits, cache, mask, last_pos) -> list[Generation]:
        cfg, device = self.config, self.model.device
        n = len(rows)
        eos = self.model.config.tokens.eos_id
        out_ids = torch.zeros(n, cfg.max_new_tokens, dtype=torch.long, device=device)
        out_lp = torch.zeros(n, cfg.max_new_tokens, device=device)
        lengths = torch.full((n,), cfg.max_new_tokens, device=device)
        active = torch.arange(n, device=device)  # global row of each batch row
        run = torch.zeros(n, dtype=torch.long, device=device)
        seen_stop = torch.zeros(n, dtype=torch.bool, device=device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None

        for step in range(cfg.max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            next_ids = self._pick(logp, generator)
            out_ids[active, step] = next_ids
            out_lp[active, step] = logp.gather(1, next_ids[:, None])[:, 0]
            run, hit = self.stops.step(run, next_ids)
            seen_stop |= hit
            done = (seen_stop | (next_ids == eos)) if step + 1 >= cfg.min_new_tokens else torch.zeros_like(hit)
            lengths[active[done]] = step + 1
            if step + 1 == cfg.max_new_tokens or bool(done.all()):
                break
            keep = (~done).nonzero().flatten()
            if len(keep) < len(active):  # drop finished rows from the batch
                active, run, seen_stop, next_ids = active[keep], run[keep], seen_stop[keep], next_ids[keep]
                mask, last_pos = mask[keep], last_pos[keep]
                cache.batch_select_indices(keep)
            last_pos = last_pos + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = lm_forward(self.model.llm, cache, input_ids=next_ids[:, None], attention_mask=mask,
                                       position_ids=last_pos[:, None])
            logits = logits[:, -1]

        ids_cpu, lp_cpu, len_cpu = out_ids.cpu(), out_lp.cpu(), lengths.long().cpu()
        gens = []
        for i in range(n):
            k = int(len_cpu[i])
            token_ids = ids_cpu[i, :k].tolist()
            raw = self.tokenizer.decode(token_ids)
            gens.append(Generation(text=cut_answer(raw), token_ids=token_ids, logprobs=lp_cpu[i, :k].tolist(), raw=raw))
        return gens

    def _pick(self, logp: torch.Tensor, generator) -> torch.Tensor:
        cfg = self.config
        if not cfg.do_sample:
            return logp.argmax(dim=-1)
        scores = logp / max(cfg.temperature, 1e-5)
        if cfg.top_k:
            kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a DynamicCache, across transformers versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x

