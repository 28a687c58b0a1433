"""The embedded server's app in plain Ray actors, without Ray Serve: a control for the Ray benchmarks.

    python benchmarks/ray_actor_servers.py --port 8000 --actors 16 --gpus 0.0625

Starts a local Ray and ``--actors`` actors (``--gpus`` of a GPU and an equal share of the cores each, as Serve's
fused replicas get), each running the app of `segment serve` in uvicorn on one listening socket that all of them
accept on, as `segment serve --workers N` does. The socket is made here and handed to every actor over a Unix
socket (SCM_RIGHTS), so the kernel gives each new connection to an actor waiting in accept, not to one picked by
a hash. Runs until SIGINT or SIGTERM, then shuts Ray down.

Why: on the H200 the same request loop ran as fast in a Ray worker as in a plain process
(`benchmarks/gpu_waits.py`), yet Serve's fused replicas served 0.68-0.76x of the embedded server's workers. This
server runs in Ray's workers like the replicas but takes its requests as the embedded workers do: if it serves
what the embedded server does, the rest of the gap is in Serve's path from HAProxy to the app
(`benchmarks/ray_vs_embedded.py --servers embedded,actors,ray`).
"""

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.cli import worker_environment  # noqa: E402


def serve_actor_class():
    """The actor: receives the listening socket, then serves the app on it from a thread of its own."""
    import ray

    @ray.remote
    class AppServer:
        def __init__(self, handoff: str, log_level: str):
            import uvicorn

            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(handoff)
                _, fds, _, _ = socket.recv_fds(conn, 1, 1)
            listener = socket.socket(fileno=fds[0])
            self.server = uvicorn.Server(uvicorn.Config("app.main:create_app", factory=True, log_level=log_level,
                                                        timeout_graceful_shutdown=5))
            # uvicorn leaves signals alone off the main thread: Ray's worker keeps its own handling.
            threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[listener])), daemon=True,
                             name="uvicorn").start()

        def ready(self, timeout: float) -> int:
            """This worker's pid once its app has started (the model loaded), or an error after ``timeout``."""
            deadline = time.monotonic() + timeout
            while not self.server.started:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app in worker {os.getpid()} did not start in {timeout:.0f} s")
                time.sleep(0.1)
            return os.getpid()

    return AppServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--gpus", type=float, default=0.0, help="GPUs per actor (0.0625: 16 share one)")
    ap.add_argument("--start-timeout", type=float, default=300)
    args = ap.parse_args()
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below runs
    listener = socket.create_server((args.host, args.port), backlog=2048)
    handoff_dir = tempfile.mkdtemp(prefix="segment-actors-")
    handoff = socket.socket(socket.AF_UNIX)
    handoff.bind(os.path.join(handoff_dir, "listener"))
    handoff.listen(args.actors)
    handoff.settimeout(args.start_timeout)  # an actor never placed (too few CPUs or GPUs in Ray) ends the start
    cpus = max(1, (os.cpu_count() or 1) // args.actors)
    # The actors read what `segment serve --workers N` sets for its workers: Ray's workers inherit the
    # environment of the local Ray this process starts.
    with worker_environment(args.actors):
        try:
            ray.init(include_dashboard=False, log_to_driver=True)
            server = serve_actor_class().options(num_cpus=cpus, num_gpus=args.gpus)
            actors = [server.remote(handoff.getsockname(), os.environ.get("SEGMENT_LOG_LEVEL", "warning"))
                      for _ in range(args.actors)]
            for _ in actors:
                conn, _ = handoff.accept()
                with conn:
                    socket.send_fds(conn, [b"s"], [listener.fileno()])
            pids = ray.get([a.ready.remote(args.start_timeout) for a in actors])
            print(f"{len(pids)} actors serving on http://{args.host}:{args.port} (pids {pids})", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
        finally:
            ray.shutdown()
            listener.close()
            shutil.rmtree(handoff_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
