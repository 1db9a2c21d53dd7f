import json
import shutil
from dataclasses import replace

import pytest
import torch

from model.checkpoint import load_pretrained, random_init
from model.prompt import build_prompt
from model.train import (IGNORE, Batches, TrainConfig, encode_conversation, read_conversations, set_trainable, train,
                         training_loss)
from synth.dataset import write_dataset

TURNS = [
    {"from": "human", "value": "What is the color of <region1>?", "regions": [1]},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "What is the relationship between <region1> and <region2>?", "regions": [0, 1]},
    {"from": "gpt", "value": "region1 is left of region2"},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("world"), range(12))


def test_loss_mask_covers_exactly_the_assistant_turns(tiny):
    tok = tiny.tokenizer
    enc = encode_conversation(tok, TURNS, tiny.config.system, max_length=4096)
    assert len(enc.ids) == len(enc.labels)
    supervised = [i for i, l in zip(enc.ids, enc.labels) if l != IGNORE]
    assert supervised == tok.pieces.encode("Assistant: red\n###") + tok.pieces.encode(
        "Assistant: region1 is left of region2\n###")
    # the first prompt is exactly what inference sends for that question
    first = tok.encode(build_prompt("What is the color of <region1>?"))
    assert enc.ids[: len(first)] == first and all(l == IGNORE for l in enc.labels[: len(first)])
    assert enc.boxes == [1, 0, 1]  # one entry per <bbox>, in order
    assert enc.ids.count(tiny.config.tokens.bbox_id) == 3


def test_long_conversations_drop_whole_turns(tiny):
    enc = encode_conversation(tiny.tokenizer, TURNS, tiny.config.system, max_length=120)
    assert tiny.tokenizer.decode([i for i, l in zip(enc.ids, enc.labels) if l != IGNORE]) == "Assistant: red\n###"
    with pytest.raises(ValueError, match="names regions"):
        encode_conversation(tiny.tokenizer, [{"from": "human", "value": "<region2>?", "regions": [0]},
                                             {"from": "gpt", "value": "x"}], tiny.config.system, 4096)


@pytest.mark.parametrize("stage, trainable", [(1, {"spi_module"}), (2, {"mm_projector", "spi_module", "llm"})])
def test_a_few_steps_of_each_stage_reduce_the_loss(world, stage, trainable):
    loaded = random_init("tiny", seed=1)
    assert set(set_trainable(loaded.model, stage)) == trainable
    for name, p in loaded.model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in trainable), name
    assert not any(p.requires_grad for p in loaded.model.vision_tower.parameters())
    cfg = TrainConfig(data=[str(world / "conversations.jsonl")], batch_size=2, max_turns=6)
    batch = next(Batches(read_conversations(cfg.data), loaded, cfg).epoch(0))
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=3e-3)
    with torch.no_grad():
        before = float(training_loss(loaded, batch))
    for _ in range(6):
        training_loss(loaded, batch).backward()
        optim.step()
        optim.zero_grad()
    with torch.no_grad():
        after = float(training_loss(loaded, batch))
    # stage 1 moves only the region tokens (3 of ~150 inputs) under a random LLM: a small but real drop
    assert after < before - (0.005 if stage == 1 else 0.5), (before, after)


def test_training_saves_and_resumes(world, tmp_path):
    cfg = TrainConfig(data=[str(world / "conversations.jsonl")], out=str(tmp_path / "run"), init="random:tiny",
                      max_steps=4, save_every=2, batch_size=2, max_turns=4, warmup_steps=1, lr=1e-3)
    final = train(cfg, progress=False)
    assert final.name == "checkpoint-4"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "step"} and state["step"] == 4
    uninterrupted = load_pretrained(final).model.state_dict()

    # interrupted after step 2 (6 batches an epoch: mid-epoch): the resumed run repeats the uninterrupted one
    # exactly, which needs the weights, the optimizer, the schedule and the data position of checkpoint-2
    shutil.rmtree(final)
    again = train(cfg, progress=False)
    assert again.name == "checkpoint-4"
    resumed = load_pretrained(again).model.state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in uninterrupted.items())

    # a longer run picks up at step 4 and continues from those weights, on its own schedule
    longer = TrainConfig(**{**cfg.__dict__, "max_steps": 6, "keep_checkpoints": 5})
    resumed = train(longer, progress=False)
    assert resumed.name == "checkpoint-6"
    assert not (tmp_path / "run" / "checkpoint-5").exists()
    after = load_pretrained(resumed).model.state_dict()
    changed = [k for k in uninterrupted if not torch.equal(uninterrupted[k], after[k])]
    assert changed and all(not k.startswith("vision_tower.") for k in changed)
    assert json.loads((resumed / "train_config.json").read_text())["max_steps"] == 6
    assert torch.load(resumed / "trainer_state.pt", weights_only=True)["step"] == 6


def _averaged_steps(cfg: TrainConfig, ranks: list[int], world: int) -> dict:
    """What DDP computes, written out in one process: each step, every rank in ``ranks`` takes its
    own shard's batch, their gradients are averaged (over ``len(ranks)``), clipped, and one AdamW
    step is taken. With one rank of ``world`` it is that rank training alone on its shard."""
    from model.checkpoint import init_or_load
    from model.loop import steps, warmup_cosine_schedule

    loaded = init_or_load(cfg.init, seed=cfg.seed)
    model = loaded.model.restore_buffers()
    model.train()
    model.vision_tower.train(False)
    set_trainable(model, cfg.stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = warmup_cosine_schedule(optim, cfg.warmup_steps, cfg.max_steps)
    records = read_conversations(cfg.data)
    shards = [Batches(records, loaded, cfg, rank, world) for rank in ranks]
    per_epoch = len(records) // world // cfg.batch_size
    streams = [steps(0, cfg.max_steps, per_epoch, shard.epoch) for shard in shards]
    for batches in zip(*streams):
        grads = []
        for _, batch in batches:
            model.zero_grad(set_to_none=True)
            training_loss(loaded, batch).backward()
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params])
        for p, *g in zip(params, *grads):
            p.grad = torch.stack(g).mean(0)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optim.step()
        sched.step()
    return model.state_dict()


def test_the_same_loop_runs_ddp_on_ray_train(world, tmp_path):
    """Two Ray Train workers are one DDP run: each reads its own shard, gradients are averaged, so
    the weights equal one process averaging both shards' gradients, and neither rank alone."""
    import ray

    from jobs.train import train_on_ray

    cfg = TrainConfig(data=[str(world / "conversations.jsonl")], out=str(tmp_path / "ray_run"), init="random:tiny",
                      max_steps=2, save_every=2, batch_size=1, max_turns=2, warmup_steps=1, lr=1e-3)
    try:
        final = train_on_ray(cfg, workers=2, cpus_per_worker=0.5)
    finally:
        ray.shutdown()
    assert final is not None and final.name == "checkpoint-2"
    assert torch.load(final / "trainer_state.pt", weights_only=True)["step"] == 2
    got = load_pretrained(final)
    assert got.config.name == "tiny"
    got = got.model.state_dict()

    ddp = _averaged_steps(cfg, ranks=[0, 1], world=2)
    for key, value in ddp.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=5e-5, msg=key)
    for rank in (0, 1):  # a rank that trained alone (no gradient averaging) ends elsewhere
        alone = _averaged_steps(cfg, ranks=[rank], world=2)
        assert max(float((alone[k] - got[k]).abs().max()) for k in got if k.startswith("llm.")) > 1e-3


def test_each_step_clips_the_gradient_norm_and_follows_the_schedule(world, tmp_path):
    """Seen from the optimizer (a global step pre-hook): the gradient it is given never has a norm
    above ``grad_clip``, although unclipped it would, and its LR is warmup + cosine at every step."""
    from model.loop import warmup_cosine
    from tests.conftest import gradient_norms_and_lrs

    def norms_and_lrs(grad_clip):
        cfg = TrainConfig(data=[str(world / "conversations.jsonl")], out=str(tmp_path / f"clip{grad_clip}"),
                          init="random:tiny", max_steps=4, warmup_steps=2, batch_size=2, max_turns=2, lr=1e-3,
                          grad_clip=grad_clip)
        return gradient_norms_and_lrs(lambda: train(cfg, progress=False))

    unclipped, lrs = norms_and_lrs(1e9)
    assert len(unclipped) == 4 and min(unclipped) > 0.05
    assert lrs == pytest.approx([1e-3 * warmup_cosine(2, 4)(s) for s in range(4)])
    clipped, _ = norms_and_lrs(0.05)
    assert all(n <= 0.05 * 1.001 for n in clipped), clipped
    assert clipped[0] == pytest.approx(0.05, rel=1e-3)


def test_gradient_checkpointing_recomputes_the_llm_layers_in_backward(world, tmp_path):
    """With ``gradient_checkpointing`` each LLaMA layer runs again in the backward pass (its MLP is
    entered twice per step, counted by a global forward pre-hook); the training is the same."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    def run(checkpointing):
        entered = []
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: entered.append(1) if isinstance(module, LlamaMLP) else None)
        cfg = TrainConfig(data=[str(world / "conversations.jsonl")], out=str(tmp_path / f"gc{checkpointing}"),
                          init="random:tiny", max_steps=2, warmup_steps=1, batch_size=2, max_turns=2, lr=1e-3,
                          gradient_checkpointing=checkpointing)
        try:
            final = train(cfg, progress=False)
        finally:
            hook.remove()
        return len(entered), load_pretrained(final).model.state_dict()

    layers = random_init("tiny").config.llm.num_layers
    plain, plain_weights = run(False)
    recomputed, weights = run(True)
    assert (plain, recomputed) == (2 * layers, 2 * 2 * layers)  # 2 steps
    for key, value in plain_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-5, msg=key)


def test_an_unfrozen_vision_tower_learns_and_a_frozen_one_does_not(world):
    loaded = random_init("tiny", seed=2)
    cfg = TrainConfig(data=[str(world / "conversations.jsonl")], batch_size=2, max_turns=4)
    batch = next(Batches(read_conversations(cfg.data), loaded, cfg).epoch(0))
    for unfrozen in (False, True):
        set_trainable(loaded.model, 2, train_vision_tower=unfrozen)
        loaded.model.zero_grad(set_to_none=True)
        training_loss(loaded, batch).backward()
        grads = [p.grad for p in loaded.model.vision_tower.parameters()]
        assert all(g is None for g in grads) != unfrozen
        assert loaded.model.spi_module.roi_align.updims.weight.grad is not None


def test_freeze_keeps_a_stage_module_frozen():
    loaded = random_init("tiny", seed=1)
    assert set_trainable(loaded.model, 2, freeze=["spi_module"]) == ["mm_projector", "llm"]
    assert not any(p.requires_grad for p in loaded.model.spi_module.parameters())
    assert all(p.requires_grad for p in loaded.model.llm.parameters())
    with pytest.raises(ValueError, match="which stage 1 does not train"):
        set_trainable(loaded.model, 1, freeze=["llm"])


def test_box_jitter_moves_boxes_a_little_inside_the_image_and_is_seeded(world, tiny):
    import random

    from model.train import jitter_box

    rng = random.Random(0)
    for _ in range(200):
        x1, y1, x2, y2 = jitter_box([90, 5, 100, 45], 0.5, 100, 50, rng)  # large noise at the corner
        assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 50 and x2 - x1 >= 1 and y2 - y1 >= 1
    moves = [abs(a - b) / 40 for _ in range(200) for a, b in zip(jitter_box([10, 10, 50, 50], 0.05, 500, 500, rng),
                                                                    [10, 10, 50, 50])]
    assert 0.02 < sum(moves) / len(moves) < 0.06  # mean |N(0, 0.05)| = 0.04 of the side

    data = [str(world / "conversations.jsonl")]
    exact = TrainConfig(data=data, init="random:tiny", batch_size=2, max_turns=4)
    records = read_conversations(data)
    plain = next(Batches(records, tiny, exact).epoch(0))["boxes"]
    jittered = [next(Batches(records, tiny, replace(exact, box_jitter=0.05)).epoch(0))["boxes"] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(jittered[0], jittered[1]))  # same seed, same noise
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(plain, jittered[0])])
    assert 0 < diff.max() < 0.1 and diff.mean() > 1e-4


def test_config_files_refuse_unknown_keys_and_read_data_relative_to_the_file(tmp_path):
    from model.configfile import ConfigError

    folder = tmp_path / "cfg"
    folder.mkdir()
    path = folder / "train.toml"
    path.write_text('data = ["world/a.jsonl", "/abs/b.jsonl"]\ninit = "random:tiny"\nmax_steps = 3\n')
    cfg = TrainConfig.from_file(path)
    assert cfg.data == [str(folder / "world/a.jsonl"), "/abs/b.jsonl"] and cfg.max_steps == 3
    path.write_text('data = ["a.jsonl"]\nmax_step = 3\n')
    unknown = r"train\.toml: unknown option max_step; valid options: .*max_steps"
    with pytest.raises(ConfigError, match=unknown):
        TrainConfig.from_file(path)
    path.write_text('fsdp = true\n')
    with pytest.raises(ConfigError, match="fsdp = true is not supported"):
        TrainConfig.from_file(path)


def test_data_weights_set_how_often_each_source_is_seen(world, tmp_path):
    """Labelled data twice per epoch, pseudo-labels half (a fresh half each epoch): the epoch's
    size is fixed, so steps per epoch (and resuming) do not move."""
    from collections import Counter

    conversations = world / "conversations.jsonl"
    lines = conversations.read_text().splitlines()
    labelled, pseudo = tmp_path / "labelled.jsonl", tmp_path / "pseudo.jsonl"
    absolute = [line.replace('"images/', f'"{world}/images/') for line in lines]  # the files move, the images not
    labelled.write_text("\n".join(absolute[:4]) + "\n")
    pseudo.write_text("\n".join(absolute[4:]) + "\n")
    cfg = TrainConfig(data=[str(labelled), str(pseudo)], data_weights=[2.0, 0.5], batch_size=2, seed=3)
    records = read_conversations(cfg.data)
    assert [r["source"] for r in records] == [0] * 4 + [1] * 8
    batches = Batches(records, random_init("tiny"), cfg)
    assert batches.epoch_size == 4 * 2 + 8 // 2
    seen = [Counter(batches.order(e)) for e in range(3)]
    for counts in seen:
        assert all(counts[i] == 2 for i in range(4))  # every labelled record twice
        assert sorted(counts[i] for i in range(4, 12)) == [0] * 4 + [1] * 4  # half of the pseudo-labels once
    assert len({tuple(sorted(i for i in c if i >= 4)) for c in seen}) > 1  # another half in another epoch
    same = TrainConfig(data=cfg.data, batch_size=2, seed=3)  # no weights: every record once, as before
    assert sorted(Batches(records, random_init("tiny"), same).order(0)) == list(range(12))
    with pytest.raises(ValueError, match="2 weights for 1 data files"):
        TrainConfig(data=[str(labelled)], data_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="must be > 0"):
        TrainConfig(data=[str(labelled), str(pseudo)], data_weights=[1.0, 0.0])
