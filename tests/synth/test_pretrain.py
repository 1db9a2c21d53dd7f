"""Vision pretraining of the demo (synth/pretrain.py) on the tiny preset."""

import shutil

import pytest
import torch

from model.checkpoint import init_or_load, load_pretrained, random_init
from synth.dataset import write_dataset
from synth.evaluate import read_ground_truth
from synth.pretrain import Heads, PretrainConfig, pretrain, pretrain_loss


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("world"), range(8))


def test_a_few_steps_reduce_the_loss_and_touch_only_the_vision_side(world):
    loaded = random_init("tiny", seed=2)
    model = loaded.model
    model.requires_grad_(False)
    model.vision_tower.requires_grad_(True)
    model.spi_module.requires_grad_(True)
    heads = Heads(loaded.config.llm.hidden_size)
    truths = read_ground_truth(world)[:4]
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=3e-3)
    before_llm = {k: v.clone() for k, v in model.llm.state_dict().items()}
    with torch.no_grad():
        before, acc = pretrain_loss(loaded, heads, truths)
    assert set(acc) == {"shape", "color", "material", "size", "relation"}
    for _ in range(8):
        loss, _ = pretrain_loss(loaded, heads, truths)
        loss.backward()
        optim.step()
        optim.zero_grad()
    with torch.no_grad():
        after, _ = pretrain_loss(loaded, heads, truths)
    assert float(after) < float(before) - 0.5, (float(before), float(after))
    assert all(torch.equal(before_llm[k], v) for k, v in model.llm.state_dict().items())


def test_pretraining_checkpoints_and_resumes(world, tmp_path):
    cfg = PretrainConfig(world=str(world), out=str(tmp_path / "run"), init="random:tiny", steps=3, batch_size=2,
                         save_every=1, warmup_steps=1)
    final = pretrain(cfg, progress=False)
    assert final.name == "checkpoint-3"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    uninterrupted = load_pretrained(final).model.state_dict()
    heads = torch.load(final / "pretrain_state.pt", weights_only=True)["heads"]

    # interrupted after step 2 (4 batches an epoch: mid-epoch): the resumed run repeats the uninterrupted one
    # exactly, which needs the weights, the heads, the optimizer and the data position of checkpoint-2
    shutil.rmtree(final)
    again = pretrain(cfg, progress=False)
    assert again.name == "checkpoint-3"
    assert all(torch.equal(v, load_pretrained(again).model.state_dict()[k]) for k, v in uninterrupted.items())
    state = torch.load(again / "pretrain_state.pt", weights_only=True)
    assert set(state) == {"heads", "optimizer", "scheduler", "step"} and state["step"] == 3
    assert all(torch.equal(v, state["heads"][k]) for k, v in heads.items())

    # a longer run continues from there and trains only the vision side
    resumed = pretrain(PretrainConfig(**{**cfg.__dict__, "steps": 4}), progress=False)
    assert resumed.name == "checkpoint-4"
    assert torch.load(resumed / "pretrain_state.pt", weights_only=True)["step"] == 4
    after = load_pretrained(resumed).model.state_dict()
    changed = {k.split(".")[0] for k in uninterrupted if not torch.equal(uninterrupted[k], after[k])}
    assert changed == {"vision_tower", "spi_module"}


def test_each_step_clips_the_gradient_norm_and_follows_the_schedule(world, tmp_path):
    """Seen from the optimizer (a global step pre-hook): the gradient of the vision side and the
    heads never has a norm above ``grad_clip``, although unclipped it would, and the LR is warmup +
    cosine at every step."""
    from model.loop import warmup_cosine
    from tests.conftest import gradient_norms_and_lrs

    def norms_and_lrs(grad_clip):
        cfg = PretrainConfig(world=str(world), out=str(tmp_path / f"clip{grad_clip}"), init="random:tiny", steps=4,
                             batch_size=2, save_every=4, warmup_steps=2, lr=1e-3, grad_clip=grad_clip)
        return gradient_norms_and_lrs(lambda: pretrain(cfg, progress=False))

    unclipped, lrs = norms_and_lrs(1e9)
    assert len(unclipped) == 4 and min(unclipped) > 0.05
    assert lrs == pytest.approx([1e-3 * warmup_cosine(2, 4)(s) for s in range(4)])
    clipped, _ = norms_and_lrs(0.05)
    assert all(n <= 0.05 * 1.001 for n in clipped), clipped
    assert clipped[0] == pytest.approx(0.05, rel=1e-3)


def test_init_is_a_model_spec(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()  # a folder that is not a checkpoint does not shadow a spec
    monkeypatch.chdir(tmp_path)
    assert init_or_load("random:tiny").config.name == "tiny"
    with pytest.raises(ValueError, match="not a local checkpoint directory"):
        init_or_load("no-such-thing")
