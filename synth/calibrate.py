"""Calibration on the synthetic world: every answer the pipeline gives about world scenes,
labelled right or wrong by the world's exact ground truth, and the fit and check of
``pipeline.calibrate`` on them (``roiscribe calibrate``).

``jitter_agreement`` measures the ``jitter_agrees`` signal: every question asked again about the
same regions with their boxes moved a little (a second pass through the given-boxes detector).
"""

from __future__ import annotations

import numpy as np

from pipeline.calibrate import (ATTRIBUTE_KINDS, UNKNOWN_AGREEMENT, Calibration, Example, evaluate, named_value,
                                region_signals, relation_signals, signal_report, split,
                                thresholds_for_precision)

def jitter_agreement(results, loaded, config, jitter: float = 0.05, seed: int = 0) -> list[dict]:
    """Ask every question again with each box's edges moved by Gaussian noise (``jitter`` of the
    box's width / height; ``model.train.jitter_box``) -> per result ``{region: {answer name:
    1.0 | 0.0}, "relations": {(subject, object): 1.0 | 0.0 | 0.5}}``: whether the answer stayed the
    same (a relation the second pass did not ask: 0.5). Empty for an image that failed."""
    import dataclasses
    import random

    from detectors.given import GivenBoxes
    from model.train import jitter_box
    from pipeline.flow import annotate
    from pipeline.records import Regions

    rng = random.Random(seed)
    mapping = {}
    for res in results:
        if res.status == "ok":
            boxes = [jitter_box(b, jitter, res.width, res.height, rng) for b in res.regions.boxes.tolist()]
            mapping[res.uri] = Regions(np.asarray(boxes, np.float32).reshape(-1, 4), res.regions.scores,
                                       res.regions.class_ids, list(res.regions.class_names))
    again = annotate([res.uri for res in results], GivenBoxes(mapping), loaded,
                     dataclasses.replace(config, postprocess=None))  # the same regions, in the same order
    out = []
    for first, second in zip(results, again):
        agree: dict = {}
        if first.ok and second.ok and len(second.regions) == len(first.regions):
            for r, (a, b) in enumerate(zip(first.answers, second.answers)):
                agree[r] = {k: float(a[k].value == b[k].value) for k in a if k in b}
            asked = {(x.subject, x.object): x.predicate for x in second.relations}
            agree["relations"] = {(x.subject, x.object): (float(asked[(x.subject, x.object)] == x.predicate)
                                                          if (x.subject, x.object) in asked else UNKNOWN_AGREEMENT)
                                  for x in first.relations}
        out.append(agree)
    return out


# Labelled examples from the synthetic world -------------------------------------------------------

def world_examples(results, truths, iou: float = 0.5, jitter: list[dict] | None = None) -> list[Example]:
    """Every answer of ``annotate()`` results, labelled right or wrong by the world's ground truth
    (``synth.evaluate.GroundTruth``): regions matched at IoU >= ``iou`` (greedy, by score).
    ``jitter``: ``jitter_agreement`` of the same results, if measured."""
    from pipeline.review import vocabulary_value
    from synth.evaluate import match

    out: list[Example] = []
    for k, (result, truth) in enumerate(zip(results, truths)):
        if result.status != "ok":
            continue
        agree = jitter[k] if jitter is not None else {}
        pairs = match(result.regions, truth.regions.boxes, iou)
        for r in range(len(result.regions)):
            obj = truth.objects[pairs[r]] if r in pairs else None
            signals = region_signals(result, r, agree.get(r))
            answers = result.answers[r] if r < len(result.answers) else {}
            for kind, features in signals.items():
                if obj is None:
                    right = False
                elif kind in ATTRIBUTE_KINDS:
                    right = answers[kind].value == obj[kind]
                elif kind == "caption":
                    text = answers["caption"].value
                    right = all(named_value(k, text) == obj[k] for k in ATTRIBUTE_KINDS) and \
                        _size_word(text) == obj["size"]
                else:  # region: a real object, and the detector's class is its shape
                    right = vocabulary_value("shape", result.regions.class_names[r]) == obj["shape"]
                out.append(Example(kind, features, right, result.regions.class_names[r]))
        for rel in result.relations:
            if rel.predicate is None:
                continue
            want = None
            if rel.subject in pairs and rel.object in pairs:
                want = truth.relations.get(f"{pairs[rel.subject]},{pairs[rel.object]}")
            stable = agree.get("relations", {}).get((rel.subject, rel.object), UNKNOWN_AGREEMENT)
            out.append(Example("relation", relation_signals(result, rel, stable), want is not None and rel.predicate == want))
    return out


def _size_word(text: str | None) -> str | None:
    from synth.world import SIZES

    return next((w for w in (text or "").lower().split() if w in SIZES), None)


def world_examples_of(truths, loaded, config, detector, jitter: float | None = None) -> tuple[list[Example], list[int]]:
    """Run the pipeline (``annotate``) on the world's images with ``detector``'s boxes -> the
    labelled examples and the image index of each (with ``jitter``, a second pass measures
    ``jitter_agrees``)."""
    from pipeline.flow import annotate

    results = annotate([t.image for t in truths], detector, loaded, config)
    stable = jitter_agreement(results, loaded, config, jitter) if jitter else [{}] * len(results)
    examples, images = [], []
    for i, (result, truth) in enumerate(zip(results, truths)):
        found = world_examples([result], [truth], jitter=[stable[i]])
        examples += found
        images += [i] * len(found)
    return examples, images


def calibrate_world(truths, loaded, config, detector, check_truths=None, holdout: float = 0.3,
                    seed: int = 0, jitter: float | None = None, precision: float | None = None,
                    per_class: bool = False) -> Calibration:
    """Fit on the world's answers and check on ``check_truths`` (another world: scenes of a seed
    used for nothing else), or, without one, on a ``holdout`` share of the images kept out of the
    fit. The metrics (before and after, per kind) and each signal's AUROC on the checked answers go
    into the calibration's ``metrics``; with ``precision``, per kind the threshold at which the checked
    answers kept are right that often goes into its ``thresholds`` (``thresholds_for_precision``; with
    ``per_class``, also one per detector class for regions)."""
    examples, images = world_examples_of(truths, loaded, config, detector, jitter)
    if check_truths is not None:
        fit, check = examples, world_examples_of(check_truths, loaded, config, detector, jitter)[0]
        how = f"checked on {len(check_truths)} other images"
    else:
        fit, check = split(examples, images, holdout, seed)
        how = f"checked on a held-out {holdout:.0%} of the images (seed {seed})"
    calibration = Calibration.fit(fit)
    calibration.metrics = {"checked": evaluate(calibration, check), "fitted": evaluate(calibration, fit),
                           "signals_auroc": signal_report(check), "how": how}
    calibration.fitted_on = {"images": len(truths), "answers": len(fit)}
    if precision is not None:
        calibration.thresholds = thresholds_for_precision(calibration, check, precision, per_class=per_class)
        calibration.metrics["thresholds_precision"] = precision
    return calibration
