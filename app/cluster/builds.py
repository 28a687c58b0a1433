"""Builds as Ray tasks: the build queue's runner in Ray mode (``create_app(..., build_runner=RayRunner())``).

The queue, its jobs and their progress stay the embedded service's own (``app.builds.jobs``, in the control store,
so every ingress replica and ``GET /engines/jobs/{id}`` see them). Only where the build runs changes: instead of a
child process of the ingress replica that claimed the job, a Ray task scheduled with one GPU for TensorRT (so it
lands on a GPU node) or one CPU for ONNX Runtime, which runs the same ``python -m app.builds`` child on its node
and streams the child's lines back. The task takes its node's build lock, so one build runs at a time per machine;
it is never retried: a task whose node or worker dies fails the job, saying why.
"""

import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

import ray

from ..builds.jobs import MACHINE_LOCK, ChildProcess, exit_error
from ..builds.options import BuildRequest
from ..core.errors import TensorRTUnavailable

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this ``app`` package


@ray.remote(num_returns="streaming", max_retries=0)
def run_on_node(args: list[str]):
    """Run ``python ARGS`` on this node under its build lock: its output lines, then its exit status (an int)."""
    node = ray.get_runtime_context().get_node_id()
    with open(MACHINE_LOCK, "a+") as lock:  # the embedded server's too: one build per machine
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield f"waiting for the build running on Ray node {node}"
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield f"building on Ray node {node}"
        # This worker's Python (the path may differ between nodes) and this worker's copy of the package (Ray
        # may have put it on sys.path); the child dies with the worker (ray.cancel).
        path = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH"))))
        child = ChildProcess([sys.executable, *args], env={**os.environ, "PYTHONPATH": path})
        yield from child.lines()
        yield child.proc.wait()


class RayTask:
    """A build running as a Ray task, as the queue follows it."""

    pid = None  # its process is on another node

    def __init__(self, stream, first: str):
        self.stream, self.first, self.status, self.lost, self.done = stream, first, None, None, False
        self.stopped = False

    def lines(self) -> Iterator[str]:
        yield self.first  # until the task starts (Ray may be waiting for a node with room), this says why
        try:
            for ref in self.stream:
                item = ray.get(ref)
                if isinstance(item, int):
                    self.status = item
                else:
                    yield item
        except ray.exceptions.RayError as exc:  # its node or worker died, or it was cancelled
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.lost = ("the service stopped while this build ran; queue it again" if self.stopped else
                         f"the build's Ray task was lost ({type(exc).__name__}: {reason}); queue the build again")
        self.done = True

    def outcome(self, lines: list[str]) -> str | None:
        if self.lost:
            return self.lost
        if self.status is None:
            return "the build's Ray task ended without an exit status; queue the build again"
        return exit_error(self.status, lines)

    def kill(self) -> None:
        if not self.done:
            self.stopped = True  # the cancellation that follows is ours, not a lost node
            ray.cancel(self.stream, force=True)


class RayRunner:
    """Each job a Ray task: one GPU for TensorRT, one CPU for ONNX Runtime (int8, fp16)."""

    local = False  # the task takes the lock of the node it lands on

    def check_target(self, target: str) -> None:
        if target == "tensorrt" and not ray.cluster_resources().get("GPU", 0):
            raise TensorRTUnavailable("no node of the Ray cluster has a GPU up now, which a TensorRT build needs "
                                      "(an autoscaler's GPU nodes that are scaled to zero do not count: start one)")

    def task_options(self, job: dict) -> dict:
        """The Ray task's options for ``job``: its resources (one CPU is a task's default)."""
        request = BuildRequest.model_validate_json(job["request"]) if job.get("request") else None
        return {"num_gpus": 1 if request is not None and request.options.target == "tensorrt" else 0}

    def start(self, job: dict) -> RayTask:
        options = self.task_options(job)
        need = "a free GPU" if options.get("num_gpus") else "a free CPU"
        return RayTask(run_on_node.options(**options).remote(job["command"][1:]),
                       f"started as a Ray task: waiting for a node with {need}")
