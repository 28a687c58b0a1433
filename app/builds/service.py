"""The builds service the HTTP layer calls: register an uploaded ONNX, or queue a build of a registered one."""

from pathlib import Path

from ..core.errors import BuildError, Conflict, NotFound
from ..core.metadata import ModelMeta
from ..repository import ControlStore, ModelRepository, check_name
from .jobs import Job, JobQueue, ProcessRunner, Runner
from .options import BuildOptions, BuildRequest


class Builds:
    """Model registration and build jobs over one repository; started (with the control store, where the jobs
    live) and stopped beside the serving state. ``runner``: where builds run (a child process of this worker by
    default; Ray mode passes one that runs them as Ray tasks)."""

    def __init__(self, repository: ModelRepository, runner: Runner | None = None):
        self.repository = repository
        self.runner = runner or ProcessRunner()
        self.jobs: JobQueue | None = None

    def start(self, store: ControlStore) -> None:
        self.jobs = JobQueue(store, self.runner)

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()

    def job(self, job_id: str) -> Job:
        """A job queued by any worker (404 when there is none)."""
        if self.jobs is None:
            raise Conflict("the build queue is not running")
        return self.jobs.job(job_id)

    def check_free(self, name: str) -> None:
        """409 when a model is called ``name`` or a build of ``name`` is queued or running."""
        self.repository.ensure_free(name)
        if self.jobs is not None:
            self.jobs.store.check_not_building(name)

    def register(self, name: str, staged: Path, meta: ModelMeta | None) -> dict:
        """Check a staged ONNX upload (checker, refusal rules, dry run) and move it in as ``name``."""
        return self.repository.register_onnx(name, staged, meta)

    def calibration_folder(self, name: str) -> Path:
        """The stored calibration set ``name`` (404 when there is none)."""
        folder = self.repository.root / "calibration" / check_name(name)
        if not folder.is_dir():
            raise NotFound(f"no calibration folder {name!r} under engines/calibration")
        return folder

    def submit(self, name: str, source: str, options: BuildOptions) -> Job:
        """Queue the build of ``name`` from the registered ONNX ``source``."""
        check_name(name)
        self.runner.check_target(options.target)
        src = self.repository.path(source)
        if src.suffix != ".onnx":
            raise BuildError(f"source {source!r} is not an ONNX model", status_code=400)
        self.check_free(name)
        out = self.repository.root / f"{name}{'.onnx' if options.target == 'onnxruntime' else '.engine'}"
        if self.jobs is None:
            raise Conflict("the build queue is not running")
        return self.jobs.submit(BuildRequest(name=name, source=src, output=out, options=options))
