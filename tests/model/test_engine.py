import numpy as np
import pytest
import torch

from model.engine import EngineConfig, ImageJob, RegionEngine, RegionPrompt, StopTable
from model.generate import generate_reference
from model.prompt import build_prompt
from model.vision import preprocess

QUESTIONS = [
    "What is <region1>?",
    "Can you give a description of the region mentioned by <region1>?",
    "Could you describe the region shown as <region1> in the picture in great detail?",
]


def make_jobs(box_counts=(1, 4, 16, 2), seed=0):
    rs = np.random.RandomState(seed)
    jobs = []
    for j, n in enumerate(box_counts):
        image = rs.randint(0, 256, (40 + 17 * j, 90 - 9 * j, 3)).astype(np.uint8)
        xy = rs.rand(n, 2) * 0.6
        boxes = torch.tensor(np.concatenate([xy, np.minimum(xy + 0.1 + rs.rand(n, 2) * 0.3, 1)], 1), dtype=torch.float32)
        prompts = [RegionPrompt(QUESTIONS[(i + j) % 3], (i,)) for i in range(n)]
        if n >= 2:  # multi-region prompts, regions named out of box order
            prompts.append(RegionPrompt("How does <region1> relate to <region2>?", (n - 1, 0)))
            prompts.append(RegionPrompt("Compare <region1>, <region2> and <region3>.", (1, 0, 1)))
        jobs.append(ImageJob(image, boxes, prompts))
    return jobs


def naive(tiny, jobs, **kw):
    return [[generate_reference(tiny.model, tiny.tokenizer, j.image, j.boxes[list(p.regions)],
                                build_prompt(p.question), **kw) for p in j.prompts] for j in jobs]


def assert_same(engine_out, naive_out):
    for j, (rows_e, rows_n) in enumerate(zip(engine_out, naive_out)):
        assert len(rows_e) == len(rows_n)
        for p, (e, n) in enumerate(zip(rows_e, rows_n)):
            assert e.token_ids == n.token_ids, f"image {j} prompt {p}"
            assert e.text == n.text
            np.testing.assert_allclose(e.logprobs, n.logprobs, rtol=1e-4, atol=1e-4)


def stop_hook(tiny, modulus: int):
    """Make the tiny model end its answers at data-dependent steps: whenever the sum of its 8 best
    token ids is a multiple of ``modulus``, it says '###' (a forward hook on lm_head; both paths see it)."""
    stop_id = tiny.tokenizer.pieces.encode("###")[-1]

    def hook(module, args, out):
        last = out[:, -1]
        out = out.clone()
        hit = last.topk(8).indices.sum(-1) % modulus == 0
        out[:, -1, stop_id] = torch.where(hit, last.max(-1).values + 5.0, last[:, stop_id])
        return out

    return tiny.model.llm.lm_head.register_forward_hook(hook)


@pytest.fixture
def stops_sometimes(tiny):
    handle = stop_hook(tiny, 5)
    yield
    handle.remove()


@pytest.fixture
def stops_at_varied_lengths(tiny):  # answers of 1 to 16 tokens
    handle = stop_hook(tiny, 11)
    yield
    handle.remove()


def test_engine_equals_the_naive_path_prompt_by_prompt(tiny):
    jobs = make_jobs()
    engine = RegionEngine(tiny, EngineConfig(max_new_tokens=10, max_images=3, max_prompts=7))
    assert_same(engine.run(jobs), naive(tiny, jobs, max_new_tokens=10))


def test_engine_equals_naive_when_answers_end_at_different_steps(tiny, stops_sometimes):
    jobs = make_jobs((3, 9))
    out = RegionEngine(tiny, EngineConfig(max_new_tokens=24)).run(jobs)
    lengths = {len(g.token_ids) for row in out for g in row}
    assert len(lengths) > 2, "the hook should end answers at different steps"
    assert any(g.raw.endswith("###") for row in out for g in row)
    assert_same(out, naive(tiny, jobs, max_new_tokens=24))


def test_shared_prefix_equals_recomputed(tiny, stops_sometimes):
    jobs = make_jobs((5, 2))
    shared = RegionEngine(tiny, EngineConfig(max_new_tokens=12, share_prefix=True)).run(jobs)
    recomputed = RegionEngine(tiny, EngineConfig(max_new_tokens=12, share_prefix=False)).run(jobs)
    assert_same(shared, recomputed)


def test_shared_prefix_covers_the_image_and_stops_before_the_first_bbox(tiny):
    engine = RegionEngine(tiny)
    ids = [tiny.tokenizer.encode(build_prompt(q)) for q in ("What is <region1>?", "What is <region1> doing?")]
    prefix = engine._shared_prefix(ids)
    t = tiny.config.tokens
    assert prefix.count(t.im_patch_id) == tiny.config.num_image_tokens
    assert t.bbox_id not in prefix and ids[0][len(prefix)] == t.bbox_id  # "What is region1" is shared too


def test_logprobs_equal_a_plain_forward_over_the_generated_sequence(tiny):
    jobs = make_jobs((3,))
    out = RegionEngine(tiny, EngineConfig(max_new_tokens=8, min_new_tokens=8)).run(jobs)
    job = jobs[0]
    pixels = preprocess([job.image], tiny.config.vision)
    for prompt, gen in zip(job.prompts, out[0]):
        prompt_ids = tiny.tokenizer.encode(build_prompt(prompt.question))
        ids = torch.tensor([prompt_ids + gen.token_ids])
        with torch.no_grad():
            logits = tiny.model(ids, pixels, [job.boxes[list(prompt.regions)]]).logits
        logp = torch.log_softmax(logits[0, len(prompt_ids) - 1:-1].float(), -1)
        want = logp[torch.arange(len(gen.token_ids)), torch.tensor(gen.token_ids)]
        torch.testing.assert_close(torch.tensor(gen.logprobs), want, rtol=1e-4, atol=1e-4)
        assert gen.mean_logprob == pytest.approx(float(want.mean()), abs=1e-4)


def test_sampling_is_reproducible_per_seed(tiny):
    jobs = make_jobs((4,))
    run = lambda seed: RegionEngine(tiny, EngineConfig(max_new_tokens=8, do_sample=True, top_k=50, seed=seed)).run(jobs)
    a, b, c = run(1), run(1), run(2)
    ids = lambda out: [g.token_ids for row in out for g in row]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    greedy = RegionEngine(tiny, EngineConfig(max_new_tokens=8)).run(jobs)
    assert ids(a) != ids(greedy)


def test_the_kv_budget_sets_the_slots(tiny):
    # tiny, fp32: 2 layers x (K, V) x 64 wide x 4 bytes = 1 KiB of KV cache per token
    slots = lambda n_rows, **kw: RegionEngine(tiny, EngineConfig(max_new_tokens=10, **kw)).slots_for(n_rows, 300, 24)
    assert slots(10, max_prompts=4, kv_cache_gib=10_000 / 2**20) == 4  # max_prompts binds
    assert slots(3, kv_cache_gib=10_000 / 2**20) == 3  # no more slots than rows
    # the budget binds: 300 tokens of prefixes + 4 rows of 24 fit in 400, a fifth does not
    assert slots(10, kv_cache_gib=400 / 2**20) == 4
    assert slots(10, kv_cache_gib=100 / 2**20) == 1  # over budget: one row at a time, never none


@pytest.fixture
def layer_calls(tiny):
    """(batch, sequence length) of every pass through the LLaMA layers while the engine runs (a
    forward hook on the first layer's query projection, which every pass goes through)."""
    calls = []
    handle = tiny.model.llm.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, out: calls.append(tuple(args[0].shape[:2])))
    yield calls
    handle.remove()


def test_the_prefix_is_prefilled_once_per_image_chunk_and_prompts_decode_together(tiny, layer_calls):
    jobs = make_jobs()  # 1 + 6 + 18 + 4 prompts
    cfg = EngineConfig(max_new_tokens=5, min_new_tokens=5, max_images=3)
    out = RegionEngine(tiny, cfg).run(jobs)
    calls = list(layer_calls)  # before the reference path below runs the LLM too
    n_image = tiny.config.num_image_tokens
    rows = [sum(len(jobs[j].prompts) for j in chunk) for chunk in ([0, 1, 2], [3])]
    # per chunk: the prefix (image included) once for its images, every prompt's own tokens in one
    # batch, then 4 decode steps of every row together; the image is never run again per prompt
    assert [b for b, t in calls if t >= n_image] == [3, 1]
    assert [b for b, t in calls if 1 < t < n_image] == rows
    assert [b for b, t in calls if t == 1] == [rows[0]] * 4 + [rows[1]] * 4
    assert len(calls) == 2 * (1 + 1 + 4)
    assert_same(out, naive(tiny, jobs, max_new_tokens=5, min_new_tokens=5))


def test_the_kv_cache_holds_each_prefix_once_not_once_per_row(tiny):
    jobs = make_jobs((4, 16))  # 6 + 18 prompts
    engine = RegionEngine(tiny, EngineConfig(max_new_tokens=6))
    engine.run(jobs)
    ids = [tiny.tokenizer.encode(build_prompt(p.question)) for j in jobs for p in j.prompts]
    prefix = len(engine._shared_prefix(ids))
    assert prefix > tiny.config.num_image_tokens  # the image is in the shared prefix
    width = max(len(i) for i in ids) - prefix + 6
    per_token = 2 * 2 * 64 * 4  # tiny, fp32: 2 layers x (K, V) x 64 wide x 4 bytes
    assert engine.peak_kv_bytes == (2 * prefix + len(ids) * width) * per_token  # the tensors the engine allocated
    assert engine.peak_kv_bytes < len(ids) * prefix * per_token  # what copying the prefix into every row would hold


def test_a_tight_kv_budget_refills_slots_and_keeps_the_answers(tiny, layer_calls, stops_sometimes):
    jobs = make_jobs((5,))  # 7 prompts
    ids = [tiny.tokenizer.encode(build_prompt(p.question)) for p in jobs[0].prompts]
    engine = RegionEngine(tiny, EngineConfig(max_new_tokens=12))
    prefix = len(engine._shared_prefix(ids))
    per_row = max(len(i) for i in ids) - prefix + 12
    engine = RegionEngine(tiny, EngineConfig(max_new_tokens=12, sync_every=2,
                                             kv_cache_gib=(prefix + 3 * per_row) / 2**20))
    out = engine.run(jobs)
    calls = list(layer_calls)
    decode = [b for b, t in calls if t == 1]
    refills = [b for b, t in calls if 1 < t < tiny.config.num_image_tokens]
    assert max(decode) == 3  # the budget holds 3 rows at a time
    assert refills[0] == 3 and sum(refills) == 7 and len(refills) > 1  # ended rows' slots were refilled
    # the image's prefix is prefilled once, however many refills its rows take
    assert [b for b, t in calls if t >= tiny.config.num_image_tokens] == [1]
    assert_same(out, naive(tiny, jobs, max_new_tokens=12))


def test_finished_rows_are_refilled_and_the_host_looks_only_every_few_steps(tiny, layer_calls, stops_at_varied_lengths,
                                                                             monkeypatch):
    from model import engine as engine_module

    syncs = []
    harvest = engine_module._Decoder._harvest
    monkeypatch.setattr(engine_module._Decoder, "_harvest", lambda self, gens: syncs.append(1) or harvest(self, gens))
    jobs = make_jobs((16, 16))  # 36 prompts
    out = RegionEngine(tiny, EngineConfig(max_new_tokens=16, max_prompts=8, sync_every=2)).run(jobs)
    decode = [b for b, t in layer_calls if t == 1]
    prefills = [i for i, (b, t) in enumerate(layer_calls) if 1 < t < tiny.config.num_image_tokens]
    assert [b for b, t in layer_calls if t >= tiny.config.num_image_tokens] == [2]  # both prefixes, once
    first_decode = next(i for i, (b, t) in enumerate(layer_calls) if t == 1)
    assert_same(out, naive(tiny, jobs, max_new_tokens=16))
    lengths = [len(g.token_ids) for row in out for g in row]
    assert 1 in lengths and 16 in lengths  # the answers really end at different steps
    # fixed batches of 8 would take as many steps as their longest answers; refilled slots take far fewer
    fixed = sum(max(lengths[i:i + 8]) - 1 for i in range(0, len(lengths), 8))
    assert len(decode) < 0.7 * fixed
    assert len([i for i in prefills if i > first_decode]) > 36 // 8  # slots refilled between decode steps
    assert len(syncs) <= len(decode) // 2 + 2  # the host looked once per 2 steps, not at every step


def test_two_images_with_the_same_prompts_get_their_own_answers(tiny):
    """Rows of different images decode in one batch and read only their own image's prefix."""
    rs = np.random.RandomState(7)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]])
    prompts = [RegionPrompt(q, (i % 2,)) for i, q in enumerate(QUESTIONS)]
    images = [rs.randint(0, 256, (60, 80, 3)).astype(np.uint8), rs.randint(0, 256, (50, 70, 3)).astype(np.uint8)]
    jobs = [ImageJob(im, boxes, prompts) for im in images]
    together = RegionEngine(tiny, EngineConfig(max_new_tokens=10, max_prompts=4, sync_every=3)).run(jobs)
    alone = [RegionEngine(tiny, EngineConfig(max_new_tokens=10)).run([job])[0] for job in jobs]
    for a, b in zip(together, alone):
        assert [g.token_ids for g in a] == [g.token_ids for g in b]
        np.testing.assert_allclose([g.logprobs for g in a], [g.logprobs for g in b], rtol=1e-5, atol=1e-5)
    assert [g.token_ids for g in together[0]] != [g.token_ids for g in together[1]]


def test_prompts_naming_missing_regions_are_refused(tiny):
    job = ImageJob(np.zeros((20, 20, 3), np.uint8), [[0, 0, 0.5, 0.5]], [RegionPrompt("What is <region1>?", (3,))])
    with pytest.raises(ValueError, match=r"refers to boxes \[3\], the image has 1"):
        RegionEngine(tiny).run([job])
    job.prompts = [RegionPrompt("Compare <region1> and <region2>.", (0,))]
    with pytest.raises(ValueError, match="names regions"):
        RegionEngine(tiny).run([job])


def test_images_without_prompts_and_prompts_without_regions(tiny):
    jobs = [ImageJob(np.zeros((20, 30, 3), np.uint8), torch.zeros(0, 4), []),
            ImageJob(np.full((30, 20, 3), 90, np.uint8), torch.zeros(0, 4), [RegionPrompt("Describe the picture.")])]
    out = RegionEngine(tiny, EngineConfig(max_new_tokens=5)).run(jobs)
    assert out[0] == []
    assert out[1][0].token_ids == naive(tiny, jobs[1:], max_new_tokens=5)[0][0].token_ids


@pytest.mark.parametrize(
    "pieces, stops_at",
    [
        (["a", " red", "\n", "###"], 4),
        (["a", "#", "#", "#", "b"], 4),
        (["a", "##", "", "#"], 4),  # empty texts (added tokens) are transparent, as in decode()
        (["x#", "#y", "#"], None),  # "x##y#": no run of three
        (["x#", "##"], 2),
        (["x", "a###b"], 2),
        (["#", "a", "##"], None),
    ],
)
def test_stop_table_finds_the_stop_string_on_ids(pieces, stops_at):
    vocab = sorted(set(pieces))
    table = StopTable(vocab)
    run = torch.zeros(1, dtype=torch.long)
    hit_at = None
    for step, piece in enumerate(pieces, 1):
        run, hit = table.step(run, torch.tensor([vocab.index(piece)]))
        if hit.item() and hit_at is None:
            hit_at = step
    assert hit_at == stops_at
    text = "".join(pieces)
    assert (stops_at is not None) == ("###" in text)


def test_each_prompt_gets_its_own_answer_limit_under_the_cap(tiny):
    jobs = make_jobs((5,))
    limits = [3, None, 9, 1, 20, 5, 2]  # None: the engine's cap
    jobs[0].prompts = [RegionPrompt(p.question, p.regions, k) for p, k in zip(jobs[0].prompts, limits)]
    out = RegionEngine(tiny, EngineConfig(max_new_tokens=12, max_prompts=3, sync_every=2)).run(jobs)[0]
    assert [len(g.token_ids) for g in out] == [min(k or 12, 12) for k in limits]  # the random model never stops
    for g, p, k in zip(out, jobs[0].prompts, limits):
        ref = generate_reference(tiny.model, tiny.tokenizer, jobs[0].image, jobs[0].boxes[list(p.regions)],
                                 build_prompt(p.question), max_new_tokens=min(k or 12, 12))
        assert g.token_ids == ref.token_ids
    jobs[0].prompts[0] = RegionPrompt(jobs[0].prompts[0].question, (0,), 0)
    with pytest.raises(ValueError, match="allows 0 answer tokens"):
        RegionEngine(tiny).run(jobs)
