"""The training-loop core (model/loop.py): checkpoints, the LR schedule, resuming, the step count."""

import json
import math

import pytest
import torch

from model.checkpoint import load_pretrained
from model.loop import (checkpoints, latest_checkpoint, load_state, progress_bar, running_mean, save_checkpoint, steps,
                        warmup_cosine, warmup_cosine_schedule)

FILES = {"state_file": "trainer_state.pt", "config_file": "train_config.json"}


def _optimizer(seed: int = 0, lr: float = 0.1, max_steps: int = 10):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(net.parameters(), lr=lr)
    return net, optim, warmup_cosine_schedule(optim, 2, max_steps)


def _step(net, optim, sched, n: int):
    x = torch.arange(6.0).reshape(2, 3) + n  # a different batch each step
    net(x).square().sum().backward()
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)


def test_warmup_cosine_values():
    f = warmup_cosine(4, 12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, 1 at its last step
    assert f(4) == 1.0  # the cosine starts at the top
    assert f(8) == pytest.approx(0.5)  # halfway through the cosine
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f(12) == pytest.approx(0.0) and f(50) == f(12)  # 0 at max_steps and after
    assert warmup_cosine(0, 10)(0) == 1.0 and warmup_cosine(5, 5)(5) == 1.0  # no warmup; no cosine


def test_the_scheduler_applies_the_schedule_to_every_group():
    net, optim, sched = _optimizer(lr=0.1, max_steps=10)
    f = warmup_cosine(2, 10)
    for s in range(12):
        assert optim.param_groups[0]["lr"] == pytest.approx(0.1 * f(s)), s
        _step(net, optim, sched, s)


def test_checkpoints_are_ordered_by_number_not_name(tmp_path):
    assert checkpoints(tmp_path / "absent") == [] and latest_checkpoint(tmp_path / "absent") is None
    for n in (9, 10, 100, 2):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-final").mkdir()  # not a step
    (tmp_path / ".checkpoint-200.tmp").mkdir()  # a save in progress
    (tmp_path / "checkpoint-300").write_text("")  # not a folder
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert latest_checkpoint(str(tmp_path)) == tmp_path / "checkpoint-100"


def test_save_writes_whole_checkpoints_and_keeps_the_newest(tiny, tmp_path):
    net, optim, sched = _optimizer()
    (tmp_path / ".checkpoint-3.tmp").mkdir()  # left by a run killed while saving step 3
    (tmp_path / ".checkpoint-3.tmp" / "junk").write_text("")
    for step in (1, 2, 10, 3):
        _step(net, optim, sched, step)
        path = save_checkpoint(tmp_path, step, tiny, optim, sched, **FILES, config={"step": step}, keep=2,
                               extra={"heads": {"w": torch.ones(2)}})
        assert path == tmp_path / f"checkpoint-{step}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3"]  # 10 is newer than 3
    ckpt = tmp_path / "checkpoint-3"
    files = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "train_config.json", "trainer_state.pt"} <= files
    assert "junk" not in files  # the stale temporary folder was cleared, not reused
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert set(state) == {"heads", "optimizer", "scheduler", "step"} and state["step"] == 3
    assert json.loads((ckpt / "train_config.json").read_text()) == {"step": 3}
    weights = load_pretrained(ckpt).model.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in tiny.model.state_dict().items())

    # a save that fails half way leaves no checkpoint-N behind, and the older ones in place
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 11, tiny, optim, sched, **FILES, config={"bad": object()}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
    with pytest.raises(ValueError, match="at least 1"):
        save_checkpoint(tmp_path, 12, tiny, optim, sched, **FILES, config={}, keep=0)


def test_resume_restores_the_optimizer_and_the_step_and_follows_the_new_schedule(tiny, tmp_path):
    net, optim, sched = _optimizer(max_steps=10)
    for s in range(3):
        _step(net, optim, sched, s)
    save_checkpoint(tmp_path, 3, tiny, optim, sched, **FILES, config={}, keep=1, extra={"net": net.state_dict()})
    saved = optim.state_dict()

    # a fresh optimizer, the weights restored by the caller, and a longer schedule
    fresh, optim2, sched2 = _optimizer(seed=1, max_steps=20)
    step, state = load_state(tmp_path / "checkpoint-3" / "trainer_state.pt", optim2, sched2)
    fresh.load_state_dict(state["net"])
    assert step == 3 and sched2.last_epoch == 3
    restored = optim2.state_dict()
    for i, s in saved["state"].items():
        assert set(s) == set(restored["state"][i])
        assert all(torch.equal(v, restored["state"][i][k]) for k, v in s.items())
    longer = warmup_cosine(2, 20)
    assert optim2.param_groups[0]["lr"] == pytest.approx(0.1 * longer(3))  # this config's schedule, now
    _step(fresh, optim2, sched2, 3)
    assert optim2.param_groups[0]["lr"] == pytest.approx(0.1 * longer(4))  # and from then on

    # with the same schedule, a resumed run repeats an uninterrupted one exactly
    resumed, optim3, sched3 = _optimizer(seed=2, max_steps=10)
    resumed.load_state_dict(load_state(tmp_path / "checkpoint-3" / "trainer_state.pt", optim3, sched3)[1]["net"])
    for s in range(3, 6):
        _step(net, optim, sched, s)
        _step(resumed, optim3, sched3, s)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in net.state_dict().items())


def test_steps_resume_mid_epoch_where_an_uninterrupted_run_is():
    def epoch(e, skip):  # 3 batches an epoch; this rank's shard has a 4th, which must not be used
        return iter([(e, b) for b in range(skip, 4)])

    whole = list(steps(0, 8, 3, epoch))
    assert whole == [(1, (0, 0)), (2, (0, 1)), (3, (0, 2)), (4, (1, 0)), (5, (1, 1)), (6, (1, 2)),
                     (7, (2, 0)), (8, (2, 1))]
    for start in range(9):
        assert list(steps(start, 8, 3, epoch)) == whole[start:]
    with pytest.raises(ValueError, match="epoch 0 has no batch"):
        list(steps(0, 2, 3, lambda e, skip: iter([])))


def test_running_mean_and_progress_bar():
    avg = running_mean({}, {"loss": 2.0})
    assert running_mean(avg, {"loss": 1.0, "acc": 0.5}) == {"loss": 0.95 * 2.0 + 0.05 * 1.0, "acc": 0.5}
    with progress_bar(True, total=10, initial=4, desc="train") as bar:
        assert bar.n == 4 and bar.total == 10 and not bar.disable
    with progress_bar(False, total=10, initial=4, desc="train") as bar:  # silent, same calls
        bar.update(1)
        bar.set_postfix(loss="1.0")
        assert bar.disable
