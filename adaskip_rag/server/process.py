"""``adaskip-rag serve`` in a child process, for scripts, notebooks and tests that talk to a server over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from types import TracebackType

_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a loopback server: never through a proxy


class ServerProcess:
    """``adaskip-rag [cli_args] serve [serve_args] --port P`` on a free port of 127.0.0.1, ready once ``/health``
    answers; stopped when the ``with`` block ends.

    Example:
        .. code-block:: python

            with ServerProcess(["--model", "./my-model"], cli_args=["--threads", "2"]) as server:
                client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")

    Raises:
        RuntimeError: the server exited, or did not answer within ``timeout`` seconds (then it is stopped).
    """

    def __init__(self, serve_args: Sequence[str] = (), *, cli_args: Sequence[str] = (), timeout: float = 300.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port: int = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "adaskip_rag.cli", *cli_args, "serve", *serve_args, "--port", str(self.port)]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"adaskip-rag serve exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"adaskip-rag serve did not answer {self.url}/health within {timeout} s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with _LOCAL.open(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except OSError:  # not listening yet, or an error status
            return False

    def stop(self) -> None:
        """Ask the server to stop (in-flight requests finish) and wait for it."""
        self.process.terminate()
        self.process.wait(60)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()
