"""Fingerprints of what made an output: the model's and the detector's weights, and the job config.

A fingerprint is a short sha256: of a file's bytes (or, for files over ``FULL_HASH_BYTES``, of its
size and its first and last ``EDGE_BYTES``, so a 13 GB checkpoint does not cost a minute of reading
on every job), of every weight file of a checkpoint directory, or of a random-init spec's text.
They go into ``manifest.json`` and make the default Label Studio model version, so a retrained
model with the same file names is a new version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FULL_HASH_BYTES = 1 << 30
EDGE_BYTES = 8 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


def file_digest(path: Path, h=None) -> "hashlib._Hash":
    h = h or hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return h


def path_fingerprint(path: str | Path) -> str:
    """12 hex digits for a weight file or a checkpoint directory (its weight and config files)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for p in files:
        file_digest(p, h)
    return h.hexdigest()[:12]


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def spec_path(spec: str) -> Path | None:
    """The local file or directory a model or detector spec loads from, if any."""
    if spec == "demo":
        return None
    for candidate in (spec, spec.split(":", 1)[-1], spec.rsplit(":", 1)[-1]):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def fingerprints(model_path: str | None, model_spec: str, detector_path: str | None, detector_spec: str,
                 config: dict) -> dict:
    """``{"model": ..., "detector": ..., "config": ...}`` short hashes (see the module docstring)."""
    def of(path, spec):
        found = Path(path) if path and Path(path).exists() else spec_path(spec)
        return path_fingerprint(found) if found else text_fingerprint(spec)

    return {"model": of(model_path, model_spec), "detector": of(detector_path, detector_spec),
            "config": text_fingerprint(json.dumps(config, sort_keys=True, default=str))}
