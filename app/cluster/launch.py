"""``segment serve --ray``: start a local Ray (or join one) and deploy the service on Ray Serve until stopped."""

import os
import signal
import threading

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray reads it
import ray  # noqa: E402  (at the top: a missing Ray fails the import, which `segment serve --ray` explains)
from ray import serve  # noqa: E402

from ..core.config import Settings  # noqa: E402
from .deployments import application  # noqa: E402

APP_NAME = "segment"
WORKER_NICENESS = "RAY_worker_niceness"  # the raylet's worker_niceness setting (default 15)


def serve_on_ray(settings: Settings, host: str, port: int, address: str | None = None) -> int:
    """Deploy the service as the Serve application ``segment`` at ``/``; Ctrl-C or SIGTERM removes it (and stops
    the local Ray this started). ``address``: ``auto`` or ``ray://host:10001`` joins a running cluster."""
    if not address:
        # Ray starts its workers at nice 15, below its own daemons; here the replicas are the service, and at 15
        # they lost the CPU to every other process of the host (on the H200 host beside the load generator: the
        # fused layout's stages took twice the embedded server's). A value the user set wins.
        os.environ.setdefault(WORKER_NICENESS, "0")
    context = ray.init(address=address, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "not running"
        print(f"segment: serving on Ray at http://{host}:{port}/ (Ray dashboard: {dashboard}); Ctrl-C stops",
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        if address:
            serve.delete(APP_NAME)  # a cluster we joined keeps running
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
