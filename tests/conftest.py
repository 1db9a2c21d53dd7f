import numpy as np
import pytest
import torch

from model.checkpoint import random_init


@pytest.fixture(scope="session")
def tiny():
    """The tiny preset with seeded random weights (float32, CPU)."""
    return random_init("tiny", seed=0)


@pytest.fixture
def rng_image():
    def make(h=60, w=90, seed=0):
        return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def coco_world(tmp_path_factory):
    """A COCO source of synthetic-world images (boxes = the ground truth) plus one broken file."""
    import json

    from PIL import Image

    from synth.world import generate_scene

    root = tmp_path_factory.mktemp("coco_world")
    (root / "imgs").mkdir()
    images, anns = [], []
    for k in range(6):
        scene = generate_scene(500 + k)
        Image.fromarray(scene.image).save(root / "imgs" / f"{k}.png")
        images.append({"id": k, "file_name": f"imgs/{k}.png", "width": scene.width, "height": scene.height})
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            anns.append({"id": len(anns), "image_id": k, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    (root / "imgs" / "broken.png").write_bytes(b"not a png")
    images.append({"id": 99, "file_name": "imgs/broken.png", "width": 10, "height": 10})
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                "categories": [{"id": 1, "name": "shape"}]}))
    return root / "coco.json"


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory):
    """A real Label Studio server (its own virtualenv, installed on first use), 127.0.0.1,
    prediction validation on; local files served from ``server.document_root``. Stopped by PID."""
    from sinks.label_studio.server import Server, install

    install()
    root = tmp_path_factory.mktemp("label_studio")
    (root / "docs").mkdir()
    server = Server(root / "data", root / "docs").start()
    yield server
    server.stop()


@pytest.fixture
def ls_token(ls_server, monkeypatch):
    """The server's admin token, provided the way users provide it: the environment."""
    from sinks.label_studio.server import TOKEN

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    return TOKEN


def gradient_norms_and_lrs(run) -> tuple[list[float], list[float]]:
    """What every optimizer step is given while ``run()`` trains, seen from a global optimizer
    step pre-hook: the global norm of the gradients, and the learning rate of the first group."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append((float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))),
                     optimizer.param_groups[0]["lr"]))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        run()
    finally:
        handle.remove()
    return [n for n, _ in seen], [lr for _, lr in seen]
