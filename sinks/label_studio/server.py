"""A local Label Studio server (the tests, the push benchmark, anyone who wants one): install,
start, stop.

Label Studio pins its own Django stack, so it lives in its own virtualenv
(``.venv-label-studio`` at the repository root unless ``ROISCRIBE_LS_VENV`` names another). The
server runs on 127.0.0.1 with a fixed admin user and legacy API token, prediction validation on,
local-files serving under a document root, and the banned-subnet list opened for 127.0.0.1 so
that it can call roiscribe's ML backend. It is stopped by its PID.

    python -m sinks.label_studio.server install        # create the virtualenv (idempotent, ~70 s)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root (sinks/label_studio/server.py)
VERSION = "1.23.2"
TOKEN = "roiscribe-test-token-0123456789abcdef"  # the fixed admin token of a server started here
USER, PASSWORD = "admin@roiscribe.test", "roiscribe-test-password"
DATABASE = "label_studio.sqlite3"  # in the data dir


def venv_dir() -> Path:
    return Path(os.environ.get("ROISCRIBE_LS_VENV", ROOT / ".venv-label-studio"))


def executable() -> Path:
    return venv_dir() / "bin" / "label-studio"


def install(quiet: bool = True) -> Path:
    """Create the virtualenv with Label Studio unless it already holds the pinned version."""
    exe = executable()
    if exe.is_file():
        return exe
    venv = venv_dir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(venv / "bin" / "pip"), "install", f"label-studio=={VERSION}"] + (["-q"] if quiet else [])
    subprocess.run(cmd, check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One running server; ``data_dir`` survives restarts (same users, projects, tasks)."""

    data_dir: Path
    document_root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    # more settings for the server, e.g. {"TASK_API_PAGE_SIZE_MAX": "100"} (a server that caps pages)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": USER,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_SENTRY_DSN": "",
            "LABEL_STUDIO_FRONTEND_SENTRY_DSN": "",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
            "fflag_feat_utc_210_prediction_validation_15082025": "true",
            # the default list bans 127.0.0.0/8, where the tests' ML backend listens
            "USE_DEFAULT_BANNED_SUBNETS": "false",
            "USER_ADDITIONAL_BANNED_SUBNETS": "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240.0) -> "Server":
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is busy; Label Studio would silently move to another one")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / "server.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(executable()), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Label Studio did not answer /health within {timeout:.0f} s; see {self.log_path}")

    def copy_database(self, data_dir: Path) -> Path:
        """Copy this server's database into ``data_dir`` (consistent while the server runs: sqlite's
        online backup), so that a second server started on it skips the migrations of a first
        start (~5 s instead of ~40 s). It holds the same users, token, projects and tasks."""
        import sqlite3

        data_dir.mkdir(parents=True, exist_ok=True)
        dest = data_dir / DATABASE
        src = sqlite3.connect(f"file:{self.data_dir / DATABASE}?mode=ro", uri=True)
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
        finally:
            out.close()
            src.close()
        return dest

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop by PID (the whole process group: the server and anything it spawned)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m sinks.label_studio.server install")
    print(install(quiet=False))
