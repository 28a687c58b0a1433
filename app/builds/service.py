"""The builds service the HTTP layer calls: register an uploaded ONNX, or queue a build of a registered one."""

from pathlib import Path

from ..core.errors import BuildError, Conflict, NotFound, TensorRTUnavailable
from ..core.metadata import ModelMeta
from ..engines import tensorrt_available
from ..repository import ModelRepository, check_name
from .jobs import Job, JobQueue
from .options import BuildOptions, BuildRequest


class Builds:
    """Model registration and build jobs over one repository; started and stopped beside the serving state."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self.jobs: JobQueue | None = None

    def start(self) -> None:
        self.jobs = JobQueue()

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()

    def job(self, job_id: str) -> Job:
        found = self.jobs.jobs.get(job_id) if self.jobs else None
        if found is None:
            raise NotFound(f"no job {job_id!r}")
        return found

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
        if options.target == "tensorrt" and not tensorrt_available():
            raise TensorRTUnavailable()
        src = self.repository.path(source)
        if src.suffix != ".onnx":
            raise BuildError(f"source {source!r} is not an ONNX model", status_code=400)
        self.repository.ensure_free(name)
        out = self.repository.root / f"{name}{'.onnx' if options.target == 'onnxruntime' else '.engine'}"
        if self.jobs is None:
            raise Conflict("the build queue is not running")
        return self.jobs.submit(BuildRequest(name=name, source=src, output=out, options=options))
