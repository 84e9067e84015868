"""A `bentoml serve` process on a free local port, ready before use and stopped after: what the demo,
the serving benchmark and the tests start.

    with ServerProcess("pipelines.serving.service:Service", env={"PIPELINES_MODEL": export}, log=path) as server:
        httpx.post(server.url + "/detect", ...)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipelines.common import free_port
from pipelines.workspace import REPO_ROOT, UserError

__all__ = ["ServerProcess", "free_port"]


class ServerProcess:
    """`python -m bentoml serve SERVICE` in its own process group, output to `log`; entering waits for
    /readyz (a UserError quoting the log's tail if it exits or times out first), leaving stops the
    whole group (SIGTERM, then SIGKILL after `stop_timeout`)."""

    def __init__(self, service: str, env: dict | None = None, log: Path | None = None, port: int | None = None,
                 ready_timeout: float = 300, stop_timeout: float = 30):
        self.service = service
        self.env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", **(env or {})}
        self.log = Path(log) if log else Path(os.devnull)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.serving.serve", self.service, "--host", "127.0.0.1", "--port",
                 str(self.port)], cwd=REPO_ROOT, env={k: str(v) for k, v in self.env.items()}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(self.log, f"the server exited ({self.proc.returncode}) before it was ready: "
                                          f"{self.tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise UserError(self.log, f"the server was not ready after {self.ready_timeout:.0f} s: {self.tail()}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(self.stop_timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
