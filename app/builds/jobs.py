"""Engine builds as background jobs: one at a time, in a child process, queued in order.

A child process keeps TensorRT's long build (and any crash in it) away from the serving process, and can be
killed. The child (``python -m app.builds``) is handed the typed :class:`BuildRequest` as JSON and calls the same
``compile_model`` as ``segment compile``, so the API and the command line build identically.
"""

import itertools
import logging
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .options import BuildRequest

log = logging.getLogger("segment.jobs")


@dataclass
class Job:
    id: str
    name: str
    command: list[str]
    state: str = "queued"  # queued, running, succeeded, failed
    progress: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def view(self) -> dict:
        return {"id": self.id, "name": self.name, "state": self.state, "progress": self.progress[-200:],
                "error": self.error, "created": self.created, "started": self.started, "finished": self.finished}


class JobQueue:
    """FIFO of build jobs with a single worker thread; ``stop`` kills a running build."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        # Guards _proc and _stopped together: without it, stop() could land after a job is marked running but
        # before its child exists, and that child would then run on unkilled.
        self._lock = threading.Lock()
        self._stopped = False
        self._worker = threading.Thread(target=self._work, name="engine-builds", daemon=True)
        self._worker.start()

    def submit(self, request: BuildRequest) -> Job:
        """Queue a build."""
        return self.run(request.name, [sys.executable, "-m", "app.builds", request.model_dump_json()])

    def run(self, name: str, command: list[str]) -> Job:
        """Queue any command as a job (its output lines are the job's progress)."""
        job = Job(id=f"job-{next(self._ids)}", name=name, command=command)
        self.jobs[job.id] = job
        self._queue.put(job)
        log.info("%s queued: %s", job.id, name)
        return job

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                with self._lock:
                    if self._stopped:
                        job.state, job.error = "failed", "the service stopped before this build started"
                        continue
                    job.state, job.started = "running", time.time()
                    self._proc = subprocess.Popen(job.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True, bufsize=1)
                for line in self._proc.stdout:
                    if line := line.rstrip():
                        job.progress.append(line)
                        log.info("%s: %s", job.id, line)
                code = self._proc.wait()
                job.state = "succeeded" if code == 0 else "failed"
                if code:
                    job.error = next((l for l in reversed(job.progress) if "error" in l.lower()),
                                     f"build exited with status {code}")
            except Exception as exc:  # the job fails; the queue keeps going
                job.state, job.error = "failed", str(exc)
            finally:
                with self._lock:
                    self._proc = None
                job.finished = time.time()
                log.info("%s %s", job.id, job.state)

    def stop(self) -> None:
        """Stop taking jobs, fail the queued ones and kill a running build (its temporary files are discarded)."""
        with self._lock:
            self._stopped = True
            if self._proc is not None:
                self._proc.kill()
        self._queue.put(None)
