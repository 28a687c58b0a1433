"""Engine builds as background jobs kept in the control store: any worker queues, one build runs at a time per
machine, in the order queued, in a child process (or wherever the queue's runner puts it: Ray mode's runner,
``app.cluster.builds``, runs it as a Ray task on a node with the resources it needs).

A child process keeps TensorRT's long build (and any crash in it) away from the serving process, and can be
killed. The child (``python -m app.builds``) is handed the typed :class:`BuildRequest` as JSON and calls the same
``compile_model`` as ``segment compile``, so the API and the command line build identically.

Every worker runs a :class:`JobQueue` thread. When the store has a queued job, the thread tries the machine's build
lock (``fcntl`` on :data:`MACHINE_LOCK`: released by the kernel when its holder dies); the holder claims the
oldest queued job, runs it and writes its progress lines to the store, where every worker reads them. A job marked
running whose owner process is gone is marked failed with that reason by the next worker that looks.
"""

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Protocol

from ..core.errors import TensorRTUnavailable
from ..engines import tensorrt_available
from ..repository import ControlStore
from .options import BuildRequest

log = logging.getLogger("segment.jobs")
POLL_S = 0.25
# One build at a time per machine, whatever starts it: the workers of every server here, whichever repository they
# serve, and Ray's build tasks on this node (``app.cluster.builds``)
MACHINE_LOCK = Path(tempfile.gettempdir()) / "segment-build.lock"


class Job:
    """A live view of one job in the store: each attribute read is current."""

    def __init__(self, store: ControlStore, job_id: str):
        self.store, self.id = store, job_id

    def view(self) -> dict:
        """The job for the API: id, name, state (queued, running, succeeded, failed), progress tail, error,
        who runs it, and when."""
        job = self.store.job(self.id)
        return {k: job[k] for k in ("id", "name", "state", "progress", "error", "owner_pid", "owner_host",
                                    "child_pid", "created", "started", "finished")}

    def __getattr__(self, name):  # state, error, progress, started, finished, ...
        if name in ("store", "id"):
            raise AttributeError(name)
        return self.store.job(self.id)[name]


try:  # loaded here, in the parent: between fork and exec the child only calls it (no dlopen there)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the worker that started it dies (even by ``kill -9``),
    so no orphaned build runs on."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def exit_error(code: int, lines: list[str]) -> str | None:
    """A build's error from its exit status and output lines (None when it succeeded)."""
    if code == 0:
        return None
    if code < 0:
        return f"the build process was killed (signal {-code}); queue the build again"
    return next((l for l in reversed(lines) if "error" in l.lower()), f"build exited with status {code}")


class Build(Protocol):
    """A job a runner started."""

    pid: int | None  # its process on this machine, when it has one

    def lines(self) -> Iterator[str]:
        """Its output lines as they come (they end when it does)."""

    def outcome(self, lines: list[str]) -> str | None:
        """Once ``lines`` ended: its error, or None when it succeeded."""

    def kill(self) -> None:
        """End it now (from any thread; nothing when it has ended)."""


class Runner(Protocol):
    """Where and how a queue runs its jobs."""

    local: bool  # builds run on this machine: the queue holds the machine's build lock while one runs

    def check_target(self, target: str) -> None:
        """Refuse (503) a target it cannot build for."""

    def start(self, job: dict) -> Build:
        """Start the claimed ``job`` (the store's row: ``command``, ``request``...)."""


class ChildProcess:
    """A job's command as a child process of this worker, killed with it."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def lines(self) -> Iterator[str]:
        for line in self.proc.stdout:
            if line := line.rstrip():
                yield line

    def outcome(self, lines: list[str]) -> str | None:
        return exit_error(self.proc.wait(), lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class ProcessRunner:
    """The default runner: each job a child process of the worker that claimed it."""

    local = True

    def check_target(self, target: str) -> None:
        if target == "tensorrt" and not tensorrt_available():
            raise TensorRTUnavailable()

    def start(self, job: dict) -> Build:
        return ChildProcess(job["command"])


class JobQueue:
    """This worker's share of the machine's build queue; ``stop`` kills a build it runs and fails the jobs it
    queued that have not started."""

    def __init__(self, store: ControlStore | None = None, runner: Runner | None = None):
        # Without a store (a queue on its own, in tests and tools): a private one in a temporary folder.
        self.store = store or ControlStore(Path(tempfile.mkdtemp(prefix="segment-jobs-")) / "control.db")
        self.runner = runner or ProcessRunner()
        self.pid = os.getpid()
        self._build: Build | None = None
        # Guards _build and _stopped together: without it, stop() could land after a job is marked running but
        # before its build exists, and that build would then run on unkilled.
        self._lock = threading.Lock()
        self._stopped = False
        self._wake = threading.Event()
        self._worker = threading.Thread(target=self._work, name="engine-builds", daemon=True)
        self._worker.start()

    def submit(self, request: BuildRequest) -> Job:
        """Queue a build (:class:`Conflict` while a build of the same name is queued or running)."""
        return self.run(request.name, [sys.executable, "-m", "app.builds", request.model_dump_json()],
                        request.model_dump_json())

    def run(self, name: str, command: list[str], request: str | None = None) -> Job:
        """Queue any command as a job (its output lines are the job's progress)."""
        job = Job(self.store, self.store.add_job(name, command, request))
        log.info("%s queued: %s", job.id, name)
        self._wake.set()
        return job

    def job(self, job_id: str) -> Job:
        self.store.job(job_id)  # NotFound when there is none
        return Job(self.store, job_id)

    def _work(self) -> None:
        while not self._stopped:
            try:
                for job_id in self.store.fail_orphaned_jobs():
                    log.warning("%s failed: its builder died", job_id)
                if self.store.has_queued_jobs():
                    self._run_next()
            except Exception:  # a locked store or a failing job: the queue keeps going
                log.exception("build queue")
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _run_next(self) -> None:
        """Under the machine's build lock (when free, and when builds run here), claim and run the oldest queued
        job."""
        with open(MACHINE_LOCK, "a+") if self.runner.local else nullcontext() as lock:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # another worker or server of this machine is building; the job waits its turn
            with self._lock:
                if self._stopped:
                    return
                job = self.store.claim_next_job(self.pid)
                if job is None:
                    return
                log.info("%s running: %s", job["id"], job["name"])
                try:
                    self._build = self.runner.start(job)
                except Exception as exc:
                    self.store.finish_job(job["id"], f"the build could not start: {exc}")
                    raise
                if self._build.pid is not None:
                    self.store.set_child(job["id"], self._build.pid)
            error = None
            try:
                error = self._follow(job["id"], self._build)
            except Exception as exc:
                error = str(exc)
            finally:
                with self._lock:
                    build, self._build = self._build, None
                build.kill()
                self.store.finish_job(job["id"], error)
                log.info("%s %s", job["id"], "failed: " + error if error else "succeeded")

    def _follow(self, job_id: str, build: Build) -> str | None:
        """Copy each of the build's output lines to the store as it comes (builds print a few dozen); its error,
        if any."""
        lines = []
        for line in build.lines():
            lines.append(line)
            self.store.add_progress(job_id, [line])
            log.info("%s: %s", job_id, line)
        return build.outcome(lines)

    def stop(self) -> None:
        """Stop taking jobs, fail the jobs this worker queued that have not started, and kill a build it runs
        (its temporary files are discarded)."""
        with self._lock:
            self._stopped = True
            if self._build is not None:
                self._build.kill()
        self._wake.set()
        try:
            self.store.fail_queued_jobs_of(self.pid, "the service stopped before this build started")
        except Exception:
            log.exception("could not fail the queued builds")
