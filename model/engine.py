"""The region inference engine: encode each image once, batch every region prompt, share the prefix.

The official code answers one question at a time and recomputes CLIP, the ~1 TMAC fused pyramid
and the whole prompt prefix for every question. Here, for a chunk of ``max_images`` images:

1. the vision tower, the image tokens and the fused pyramid run once per image, and the RoI head
   once for all boxes of all images;
2. the prompt prefix every prompt shares (system line + image tokens + preamble, up to the first
   ``<bbox>``) is prefilled once per image and its keys and values are held once per image: a row
   reads its image's prefix in place (its scores over the prefix and over its own tokens go
   through one softmax), so the KV cache holds images x prefix + rows x (suffix + answer) tokens,
   never rows x prefix;
3. rows take slots of a preallocated cache (``max_prompts`` slots, fewer where the
   ``kv_cache_gib`` budget binds); all slots decode together, one token per step written in
   place; the host looks at the batch only every ``sync_every`` steps, when the slots whose
   answers ended are refilled with waiting prompts (continuous batching) or, with none waiting,
   dropped;
4. the stop string ``###`` is detected on token ids (a per-token table of '#' runs) on the device,
   not by decoding text.

The LLaMA layers run through their own modules (projections, rotary embedding, norms, MLP, head)
around this attention. Greedy decoding gives the same tokens as
:func:`model.generate.generate_reference` (plain transformers), which the tests check prompt by
prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .checkpoint import Loaded
from .config import EngineConfig
from .generate import Generation
from .gpt4roi import ImageFeatures
from .prompt import STOP, build_prompt, cut_answer, region_order
from .vision import ImageLike, preprocess


@dataclass(frozen=True)
class RegionPrompt:
    """One question about an image. ``<regionK>`` in ``question`` is the image's box ``regions[K-1]``.
    ``max_new_tokens`` limits this answer (the engine's ``max_new_tokens`` caps it; None: the cap)."""

    question: str
    regions: tuple[int, ...] = ()
    max_new_tokens: int | None = None


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
    limit: int = 1  # answer tokens at most


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
        self.kv_bytes_per_token = 2 * l.num_layers * l.num_kv_heads * (l.hidden_size // l.num_heads) * self.model.dtype.itemsize
        self.max_tokens = int(config.kv_cache_gib * 2**30 // self.kv_bytes_per_token)
        self.peak_kv_bytes = 0  # the largest KV cache allocated at once (prefixes + slots), for benchmarks
        self.peak_kv_batch = (0, 0, 0)  # (slots, prefix tokens, images holding a prefix) of that decode batch

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

    def slots_for(self, n_rows: int, prefix_tokens: int, row_tokens: int) -> int:
        """Decode slots for ``n_rows`` prompts: at most ``max_prompts``, and as many rows of
        ``row_tokens`` (longest suffix + answer) as fit in the KV budget beside the images'
        prefixes (``prefix_tokens`` in all); at least one."""
        fit = (self.max_tokens - prefix_tokens) // max(row_tokens, 1)
        return max(1, min(n_rows, self.config.max_prompts, fit))

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
                cap = self.config.max_new_tokens
                limit = cap if prompt.max_new_tokens is None else min(prompt.max_new_tokens, cap)
                if limit < 1:
                    raise ValueError(f"job {j}: prompt {prompt.question!r} allows {limit} answer tokens; it needs >= 1")
                rows.append(_Row(local, p, [], self._box_index(prompt, text, len(boxes[local]), j), limit))
        if not rows:
            return
        prefix = self._shared_prefix(prompt_ids) if self.config.share_prefix else []
        for row, ids in zip(rows, prompt_ids):
            row.suffix = ids[len(prefix):]
        prefix_kv = self._prefill_prefix(prefix, features) if prefix else None
        images = {row.job for row in rows}
        gens = _Decoder(self, rows, len(prefix), prefix_kv, features, region_tokens, sorted(images)).run()
        for row, gen in zip(rows, gens):
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

    def _prefill_prefix(self, prefix: list[int], features: ImageFeatures) -> "_PrefixKV":
        """Prefill the shared prefix once per image -> its keys and values, held once per image."""
        model = self.model
        n_images = features.image_tokens.shape[0]
        ids = torch.tensor([prefix], device=model.device).expand(n_images, -1)
        image_tokens = features.image_tokens if self._has_image(prefix) else None
        positions = torch.arange(len(prefix), device=model.device).expand(n_images, -1)
        kv = _PrefixKV(n_images, len(prefix), [])
        causal = torch.ones(len(prefix), len(prefix), dtype=torch.bool, device=model.device).tril()

        def attend(layer: int, q, k, v):
            kv.layers.append((_flat(k), _flat(v)))
            return _attention(q, [(k, v, causal)])

        _layers(model.llm, model.embed(ids, image_tokens), positions, attend)
        return kv

    def _has_image(self, ids: list[int]) -> bool:
        return self.model.config.tokens.im_patch_id in ids

    def _pick(self, logp: torch.Tensor, generator) -> torch.Tensor:
        cfg = self.config
        if not cfg.do_sample:
            return logp.argmax(dim=-1)
        scores = logp / max(cfg.temperature, 1e-5)
        if cfg.top_k:
            kth = scores.topk(cfg.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


@dataclass
class _PrefixKV:
    """The shared prefix's keys and values per layer, each (kv heads, images x prefix, head dim):
    image ``i`` holds positions ``i * length ...``; one copy per image, read in place by its rows."""

    images: int
    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def of_image(self, layer: int, image: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.layers[layer]
        part = slice(image * self.length, (image + 1) * self.length)
        return k[:, part], v[:, part]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(images, kv heads, length, d) -> (kv heads, images x length, d)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])


class _Decoder:
    """Continuous batching over preallocated slots for the rows of one image chunk.

    Slot state lives on the device: the row's own keys and values (``own_k``/``own_v``: layers x
    slots x kv heads x ``width`` x head dim, written in place), its length, its answer so far, its
    '#' run and whether it ended. The host knows which row holds each slot and, without asking the
    device, how far each slot can have got; it syncs every ``sync_every`` steps to harvest ended
    rows and refill their slots."""

    def __init__(self, engine: RegionEngine, rows: list[_Row], prefix_len: int, prefix_kv: _PrefixKV | None,
                 features: ImageFeatures, region_tokens: list[torch.Tensor], images: list[int]):
        self.e, self.rows, self.plen, self.prefix_kv = engine, rows, prefix_len, prefix_kv
        self.features, self.region_tokens = features, region_tokens
        cfg, model = engine.config, engine.model
        self.device, self.dtype = model.device, model.dtype
        self.max_new = max(r.limit for r in rows)
        self.width = max(len(r.suffix) + r.limit for r in rows)  # own tokens a slot can hold
        n_prefix_images = prefix_kv.images if prefix_kv else 0
        self.n_slots = engine.slots_for(len(rows), n_prefix_images * prefix_len, self.width)
        l = model.config.llm
        head_dim = l.hidden_size // l.num_heads
        shape = (l.num_layers, self.n_slots, l.num_kv_heads, self.width, head_dim)
        self.own_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.own_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        held = [self.own_k, self.own_v, *(x for kv in (prefix_kv.layers if prefix_kv else []) for x in kv)]
        kv_bytes = sum(x.numel() * x.element_size() for x in held)
        if kv_bytes > engine.peak_kv_bytes:
            engine.peak_kv_bytes, engine.peak_kv_batch = kv_bytes, (self.n_slots, prefix_len, n_prefix_images)
        if prefix_kv is not None:
            self.key_image = torch.arange(n_prefix_images, device=self.device).repeat_interleave(prefix_len)
        n = self.n_slots
        self.length = torch.zeros(n, dtype=torch.long, device=self.device)  # own tokens written
        self.step = torch.zeros(n, dtype=torch.long, device=self.device)  # answer tokens picked
        self.out_ids = torch.zeros(n, self.max_new + 1, dtype=torch.long, device=self.device)  # last column: scratch
        self.out_lp = torch.zeros(n, self.max_new + 1, device=self.device)
        self.run_ = torch.zeros(n, dtype=torch.long, device=self.device)
        self.stopped = torch.zeros(n, dtype=torch.bool, device=self.device)  # the stop string seen
        self.done = torch.ones(n, dtype=torch.bool, device=self.device)  # empty slots count as done
        self.last = torch.zeros(n, dtype=torch.long, device=self.device)
        self.limit = torch.ones(n, dtype=torch.long, device=self.device)  # answer tokens allowed per slot
        self.slot_row: list[int | None] = [None] * n
        self.slot_image = torch.zeros(n, dtype=torch.long, device=self.device)
        self.host_length = [0] * n  # ``length`` of the slots holding a row, known without a sync
        self.host_steps = [0] * n  # answer tokens picked per slot holding a row
        self.host_limit = [0] * n
        self.generator = (torch.Generator(device=self.device).manual_seed(cfg.seed) if cfg.do_sample else None)
        self.eos = model.config.tokens.eos_id

    def run(self) -> list[Generation]:
        cfg = self.e.config
        waiting = list(range(len(self.rows)))[::-1]  # popped from the end: rows in order
        gens: list[Generation | None] = [None] * len(self.rows)
        free = list(range(self.n_slots))
        while True:
            if free and waiting:
                take = [(slot, waiting.pop()) for slot in free[:len(waiting)]]
                self._prefill(take)
                free = free[len(take):]
            active = [s for s, r in enumerate(self.slot_row) if r is not None]
            if not active:
                break
            for _ in range(cfg.sync_every):
                if all(self.host_steps[s] >= self.host_limit[s] for s in active):
                    break  # every answer has reached its limit: no step can add anything
                self._decode_step()
            free += self._harvest(gens)
            if not waiting and free and len(free) * 2 >= self.n_slots:
                free = self._compact()
        return gens  # type: ignore[return-value]

    # Filling slots -----------------------------------------------------------------------------
    def _prefill(self, take: list[tuple[int, int]]) -> None:
        """Prefill the suffixes of ``take`` = [(slot, row)] into their slots; pick their first token."""
        e, model = self.e, self.e.model
        rows = [self.rows[r] for _, r in take]
        slots = torch.tensor([s for s, _ in take], device=self.device)
        width = max(len(r.suffix) for r in rows)
        pad = model.config.tokens.pad_id
        ids = torch.tensor([r.suffix + [pad] * (width - len(r.suffix)) for r in rows], device=self.device)
        lengths = torch.tensor([len(r.suffix) for r in rows], device=self.device)
        images = torch.tensor([r.job for r in rows], device=self.device)
        image_tokens = self.features.image_tokens[images] if e._has_image(rows[0].suffix) else None
        regions = [self.region_tokens[r.job][r.box_index] for r in rows]
        regions = torch.cat(regions) if regions else None
        embeds = model.embed(ids, image_tokens, regions if regions is not None and len(regions) else None)
        positions = self.plen + torch.arange(width, device=self.device).expand(len(rows), -1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        groups = _groups([r.job for r in rows], self.device)

        def attend(layer: int, q, k, v):
            self.own_k[layer, slots, :, :width] = k
            self.own_v[layer, slots, :, :width] = v
            if self.prefix_kv is None:
                return _attention(q, [(k, v, causal)])
            out = torch.empty_like(q)
            for image, index in groups:  # rows of one image read that image's prefix in place
                out[index] = _attention(q[index], [(k[index], v[index], causal)],
                                        shared=(*self.prefix_kv.of_image(layer, image), None))
            return out

        hidden = _layers(model.llm, embeds, positions, attend)
        last = hidden[torch.arange(len(rows), device=self.device), lengths - 1]
        self.length[slots] = lengths
        self.step[slots] = 0
        self.run_[slots] = 0
        self.stopped[slots] = False
        self.done[slots] = False
        self.slot_image[slots] = images
        self.limit[slots] = torch.tensor([r.limit for r in rows], device=self.device)
        for (slot, row), r in zip(take, rows):
            self.slot_row[slot] = row
            self.host_length[slot], self.host_steps[slot], self.host_limit[slot] = len(r.suffix), 1, r.limit
        self._advance(slots, self._logits(last))

    # Decoding ----------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        model = self.e.model
        n = self.n_slots
        slot = torch.arange(n, device=self.device)
        at = self.length.clamp(max=self.width - 1)  # ended rows decode on until the next sync, in their last cell
        embeds = model.llm.get_input_embeddings()(self.last[:, None])
        positions = (self.plen + at)[:, None]
        span = min(max(self.host_length) + 1, self.width)  # own keys any slot can see this step
        # an active slot's cell is < span; an empty or ended one sees at least cell 0 (never an empty softmax)
        visible = (torch.arange(span, device=self.device)[None] <= at.clamp(max=span - 1)[:, None])[:, None, None, :]
        if self.prefix_kv is not None:
            same_image = (self.slot_image[:, None] == self.key_image[None])[:, None, None, :]

        def attend(layer: int, q, k, v):
            self.own_k[layer, slot, :, at] = k[:, :, 0]
            self.own_v[layer, slot, :, at] = v[:, :, 0]
            own = (self.own_k[layer, :, :, :span], self.own_v[layer, :, :, :span], visible)
            if self.prefix_kv is None:
                return _attention(q, [own])
            return _attention(q, [own], shared=(*self.prefix_kv.layers[layer], same_image))

        hidden = _layers(model.llm, embeds, positions, attend)
        self.length = self.length + 1
        self.host_length = [h + 1 for h in self.host_length]
        self.host_steps = [h + 1 for h in self.host_steps]
        self._advance(slot, self._logits(hidden[:, -1]))

    def _logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        llm = self.e.model.llm
        return llm.lm_head(llm.model.norm(last_hidden)[:, None])[:, -1]  # lm_head as a module: its hooks run

    def _advance(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        """Pick the next token of ``slots`` and record it (ended rows write into the scratch column)."""
        cfg = self.e.config
        logp = torch.log_softmax(logits.float(), dim=-1)
        ids = self.e._pick(logp, self.generator)
        step, done = self.step[slots], self.done[slots]
        column = torch.where(done, self.max_new, step)
        self.out_ids[slots, column] = ids
        self.out_lp[slots, column] = logp.gather(1, ids[:, None])[:, 0]
        run, hit = self.e.stops.step(self.run_[slots], ids)
        stopped = self.stopped[slots] | hit
        may_stop = step + 1 >= cfg.min_new_tokens
        ended = ~done & ((may_stop & (stopped | (ids == self.eos))) | (step + 1 >= self.limit[slots]))
        self.run_[slots], self.stopped[slots] = run, stopped
        self.step[slots] = torch.where(done, step, step + 1)
        self.done[slots] = done | ended
        self.last[slots] = ids

    def _harvest(self, gens: list) -> list[int]:
        """Rows whose answer ended -> their generations; returns the slots they free."""
        done, steps = self.done.tolist(), self.step.tolist()  # the one sync per ``sync_every`` steps
        ended = [s for s, r in enumerate(self.slot_row) if r is not None and done[s]]
        if not ended:
            return []
        index = torch.tensor(ended, device=self.device)
        ids, lps = self.out_ids[index].cpu(), self.out_lp[index].cpu()
        for i, s in enumerate(ended):
            k = steps[s]
            token_ids = ids[i, :k].tolist()
            raw = self.e.tokenizer.decode(token_ids)
            gens[self.slot_row[s]] = Generation(text=cut_answer(raw), token_ids=token_ids,
                                                logprobs=lps[i, :k].tolist(), raw=raw)
            self.slot_row[s] = None
            self.host_length[s] = self.host_steps[s] = 0
        return ended

    def _compact(self) -> list[int]:
        """With no row waiting, keep only the slots still answering (one copy of their own cache,
        at a sync; the images' prefixes are untouched). Returns the free slots (none)."""
        keep = [s for s, r in enumerate(self.slot_row) if r is not None]
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        self.own_k, self.own_v = self.own_k[:, index], self.own_v[:, index]
        for name in ("length", "step", "out_ids", "out_lp", "run_", "stopped", "done", "last", "slot_image", "limit"):
            setattr(self, name, getattr(self, name)[index])
        self.slot_row = [self.slot_row[s] for s in keep]
        self.host_length = [self.host_length[s] for s in keep]
        self.host_steps = [self.host_steps[s] for s in keep]
        self.host_limit = [self.host_limit[s] for s in keep]
        self.n_slots = len(keep)
        return []


def _groups(images: list[int], device) -> list[tuple[int, torch.Tensor]]:
    """(image, indices of the rows of that image), for the images present."""
    out: dict[int, list[int]] = {}
    for i, image in enumerate(images):
        out.setdefault(image, []).append(i)
    return [(image, torch.tensor(index, device=device)) for image, index in out.items()]


def _layers(llm, embeds: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """The LLaMA decoder layers over ``embeds`` (b, t, hidden) at ``positions`` (b, t), through the
    layers' own modules; ``attend(layer, q, k, v)`` (rotated, q scaled; (b, heads, t, head dim))
    stores the keys and values where it keeps them and returns the attention output."""
    model = llm.model
    cos, sin = model.rotary_emb(embeds, positions)
    hidden = embeds
    b, t, _ = embeds.shape
    for index, layer in enumerate(model.layers):
        a = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = a.q_proj(x).view(b, t, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, -1, a.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(index, q * a.scaling, k, v)
        hidden = hidden + a.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden


def _attention(q: torch.Tensor, parts, shared=None) -> torch.Tensor:
    """Softmax attention of ``q`` (b, heads, t, d; already scaled) over several key sets at once,
    as if they were concatenated: ``parts`` = [(keys, values, mask)] with keys (b, kv heads, s, d)
    and a boolean mask broadcastable to (b, 1, t, s) (None: all visible); ``shared`` = (keys,
    values, mask) with keys (kv heads, s, d) common to every row (each row's mask picks its
    image's part), read once for the whole batch instead of once per row. Scores and softmax in
    fp32; grouped-query heads share their kv head without copying it."""
    b, heads, t, d = q.shape
    kv_heads = (shared[0].shape[0] if shared is not None else parts[0][0].shape[1])
    group = heads // kv_heads
    qg = q.reshape(b, kv_heads, group * t, d)  # heads sharing a kv head are adjacent
    scores, values = [], []
    for k, v, mask in parts:
        s = torch.matmul(qg, k.transpose(-1, -2)).float().view(b, kv_heads, group, t, -1)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None] if mask.dim() == 4 else ~mask, float("-inf"))
        scores.append(s)
        values.append(v)
    if shared is not None:
        k, v, mask = shared
        s = torch.matmul(qg.transpose(0, 1).reshape(kv_heads, b * group * t, d), k.transpose(-1, -2))
        s = s.float().view(kv_heads, b, group, t, -1).transpose(0, 1)
        scores.insert(0, s if mask is None else s.masked_fill(~mask[:, :, None], float("-inf")))
    sizes = [s.shape[-1] for s in scores]
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1).to(q.dtype).split(sizes, dim=-1)
    out = 0
    if shared is not None:
        p = probs[0].transpose(0, 1).reshape(kv_heads, b * group * t, -1)
        out = torch.matmul(p, shared[1]).view(kv_heads, b, group * t, d).transpose(0, 1)
        probs = probs[1:]
    for p, v in zip(probs, values):
        out = out + torch.matmul(p.reshape(b, kv_heads, group * t, -1), v)
    return out.reshape(b, heads, t, d)
