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


def serve_on_ray(settings: Settings, host: str, port: int, address: str | None = None) -> int:
    """Deploy the service as the Serve application ``segment`` at ``/``; Ctrl-C or SIGTERM removes it (and stops
    the local Ray this started). ``address``: ``auto`` or ``ray://host:10001`` joins a running cluster."""
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
