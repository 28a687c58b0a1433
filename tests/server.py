"""`segment serve` in a child process on 127.0.0.1, for tests and benchmarks that need the real server."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`segment serve` in a child process on 127.0.0.1."""

    def __init__(self, engines: Path, model: str = "rgb", env: dict | None = None, workers: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SEGMENT_ENGINES_DIR": str(engines), "SEGMENT_MODEL": model,
               "SEGMENT_ADMIN_TOKEN": TOKEN, "SEGMENT_LOG_LEVEL": "info", **(env or {})}
        self.log = engines.parent / f"server-{self.port}.log"  # a file, so a full pipe can never stall the server
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(self.port),
                                          *(["--workers", str(workers)] if workers else [])],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready")

    def until_every_worker(self, request, check, workers: int, timeout: float = 60.0) -> dict[int, object]:
        """Repeat ``request()`` (a new connection each time, so the kernel spreads them over the workers) until
        ``workers`` distinct pids (``X-Worker``) answered with ``check(response)`` true; {pid: response}. A deadline,
        not a count: a worker restarted on a loaded machine can take many seconds to import and load."""
        seen, deadline = {}, time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = request()
            if check(r):
                seen.setdefault(int(r.headers["x-worker"]), r)
                if len(seen) >= workers:
                    return seen
            else:
                seen.pop(int(r.headers.get("x-worker", 0)), None)  # that worker has not caught up yet
                time.sleep(0.02)
        body = r.text[:300] if "json" in r.headers.get("content-type", "") else r.headers.get("content-type")
        raise AssertionError(f"only workers {sorted(seen)} of {workers} answered as expected; last: {r.status_code} "
                             f"from worker {r.headers.get('x-worker')} (model {r.headers.get('x-model')}): {body}\n"
                             f"--- server log (tail) ---\n{self.log.read_text(errors='replace')[-3000:]}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> bool:
        """SIGTERM; True when uvicorn shut down gracefully (it re-raises the signal afterwards). False, with the
        log's tail printed, when the server had already stopped by itself (uvicorn's supervisor stops every worker
        when one fails its start) or did not stop."""
        if self.proc.poll() is not None:
            print(f"the server had stopped by itself (exit {self.proc.returncode}); its log's tail:\n"
                  f"{self.log.read_text(errors='replace')[-4000:]}")
            return False
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return False
        return code in (0, -signal.SIGTERM) and "Finished server process" in self.log.read_text()


