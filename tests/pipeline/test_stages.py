"""The batch stages every runner calls (pipeline/stages.py): one image's failure stays its own,
and each stage's time is recorded under its own name."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from detectors.given import GivenBoxes
from model.engine import EngineConfig, RegionEngine
from pipeline import ComposeConfig, ImageSource, PipelineConfig, Regions
from pipeline.stages import decode_stage, describe_stage, detect_stage, run_stages

CONFIG = PipelineConfig(engine=EngineConfig(max_new_tokens=3), compose=ComposeConfig(attributes=("color",)),
                        postprocess=None, batch_size=8)


def png(width: int, seed: int) -> bytes:
    f = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, width, 3)).astype(np.uint8)).save(f, "PNG")
    return f.getvalue()


@pytest.fixture
def images():
    """Three images told apart by their width, two boxes each."""
    sources = [ImageSource(f"img{k}.png", png(50 + 10 * k, k)) for k in range(3)]
    boxes = GivenBoxes({s.uri: Regions.from_boxes([[2, 2, 30, 30], [10, 5, 45, 38]]) for s in sources})
    return sources, boxes


class FailsOn:
    """An engine that raises for any batch holding the image of width ``width`` (say, the image
    that runs the GPU out of memory) and answers the others with the real engine."""

    def __init__(self, engine: RegionEngine, width: int):
        self.engine, self.width, self.batches = engine, width, []

    def run(self, jobs):
        self.batches.append([job.image.shape[1] for job in jobs])
        if any(job.image.shape[1] == self.width for job in jobs):
            raise RuntimeError("CUDA out of memory")
        return self.engine.run(jobs)


def test_an_image_that_fails_the_engine_fails_only_itself(tiny, images):
    sources, boxes = images
    engine = RegionEngine(tiny, CONFIG.engine)
    flaky = FailsOn(engine, width=60)
    results = run_stages(sources, boxes, flaky, CONFIG)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error == "describe: RuntimeError: CUDA out of memory"
    assert len(results[1].regions) == 0 and results[1].answers == []
    assert flaky.batches == [[50, 60, 70], [50], [60], [70]]  # the batch, then each image alone

    # the others got the answers they get in a batch without the failing image
    alone = run_stages([sources[0], sources[2]], boxes, engine, CONFIG)
    for got, want in zip([results[0], results[2]], alone):
        assert len(got.answers) == 2 and got.relations
        assert [{k: a.raw for k, a in r.items()} for r in got.answers] == \
            [{k: a.raw for k, a in r.items()} for r in want.answers]
        assert [r.raw for r in got.relations] == [r.raw for r in want.relations]


class Slow:
    """Wraps a detector or an engine and sleeps ``seconds`` per batch before the real work."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.name = getattr(inner, "name", "slow")

    def detect(self, images):
        time.sleep(self.seconds)
        return self.inner.detect(images)

    def run(self, jobs):
        time.sleep(self.seconds)
        return self.inner.run(jobs)


def test_each_stage_times_itself_amortised_per_image(tiny, images):
    sources, boxes = images
    sources = sources[:2]
    detector, engine = Slow(boxes, 0.2), Slow(RegionEngine(tiny, CONFIG.engine), 1.0)
    results = describe_stage(detect_stage(decode_stage(sources, CONFIG), detector, CONFIG), engine, CONFIG)
    for r in results:
        t = r.timings
        assert set(t) == {"decode", "detect", "describe"}
        assert t["decode"] < 0.08, t  # a small PNG, decoded alone
        assert 0.1 <= t["detect"] < 0.4, t  # 0.2 s for the batch of two
        assert t["describe"] >= 0.5, t  # 1 s for the batch of two, plus the engine


def test_each_kind_of_question_gets_its_answer_limit(images, tiny):
    """``ComposeConfig.answer_tokens`` reaches the engine: a random model never stops on its own,
    so every answer is exactly as long as its kind allows (under the engine's cap)."""
    from pipeline.compose import AnswerTokens

    sources, boxes = images
    recorded = []

    class Recording(RegionEngine):
        def run(self, jobs):
            out = super().run(jobs)
            recorded.extend((p, g) for job, gens in zip(jobs, out) for p, g in zip(job.prompts, gens))
            return out

    config = PipelineConfig(engine=EngineConfig(max_new_tokens=9), postprocess=None, batch_size=8, compose=ComposeConfig(
        captions=("brief", "detailed"), attributes=("color",), answer_tokens=AnswerTokens(caption=5, attribute=2,
                                                                                          relation=3)))
    results = run_stages(sources[:1], boxes, Recording(tiny, config.engine), config)
    assert results[0].ok
    lengths = {(p.question, len(g.token_ids)) for p, g in recorded}
    t = config.compose.templates
    assert lengths == {(t.caption_brief, 5), (t.caption_detailed, 9), (t.attributes["color"], 2), (t.relation, 3)}
