"""README's cluster commands, run as written: a head started with `ray start --head` from
roiscribe's own install (the dashboard's job server included), then `ray job submit ... --
roiscribe caption ...`. The head uses Ray's token authentication, as a head does by default once a
token exists; the test gives it a token of its own and stops only the processes of its cluster."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile

import pytest
from PIL import Image

from sinks.parquet import read_rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    import psutil

    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    started = subprocess.run(["ray", "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                              "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                              "--dashboard-port", str(dashboard), "--num-cpus", "2", "--temp-dir", temp,
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        procs = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
        for p in procs:
            p.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_a_caption_job_on_the_cluster(head, tmp_path):
    address, env = head
    images = tmp_path / "images"
    images.mkdir()
    for k in range(3):
        Image.new("RGB", (48, 40), (60 * k, 100, 200)).save(images / f"{k}.png")
    out = tmp_path / "out"
    r = subprocess.run(["ray", "job", "submit", "--address", address, "--",
                        "roiscribe", "caption", str(images), "--out", str(out), "--model", "random:tiny",
                        "--detector", "given", "--max-new-tokens", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr and "runner auto: a Ray cluster address is set" in r.stdout
    rows = read_rows(out).to_pylist()
    assert sorted(row["image_id"] for row in rows) == [os.path.realpath(images / f"{k}.png") for k in range(3)]
    assert all(row["status"] == "ok" and row["processed_by"] not in ("", "in-process") for row in rows)
    assert json.loads((out / "manifest.json").read_text())["last_run"]["runner"] == "ray"
