"""Pure ASGI middleware: request counts and latency per route (and per model) for Prometheus, and the worker's
pid on every response (``X-Worker``)."""

import os
import time

from ..serving.metrics import Metrics


# Label values come only from fixed sets, so no client can grow the metrics without limit: a made-up method counts
# as "other", a path no route matches as "unmatched" (matched paths are counted by their route's template).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    """Counts every HTTP request by method, route template and status, and times it by route (and by model for
    the routes that use one); adds ``X-Worker: <pid>`` to every response."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-worker", str(os.getpid()).encode())]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            if model := scope.get("state", {}).get("model"):  # set by the dependency that held a model
                self.metrics.model_requests.labels(model, route, str(status)).inc()
                self.metrics.model_latency.labels(model).observe(time.perf_counter() - start)
