"""Video jobs: a folder per job under the results folder, with its record (``job.json``), the upload while it waits,
and the results (overlay video, statistics, label archive). One worker thread runs the jobs in order.

The record on disk is the truth, so a job outlives the client that sent it, any worker process can answer for it,
and a restart finds the jobs that were cut short and marks them failed. A process holds a lock on its own owner
file while it lives: a job whose owner's lock is free was left by a process that is gone.
"""

import fcntl
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import Busy, NotFound, ServiceError
from . import nvdec
from .served import ServedModel
from .video import Stopped, encoder, open_decoding, process

log = logging.getLogger("segment.video")

UNFINISHED = ("queued", "running")
RECORD, INPUT, STATS, LABELS = "job.json", "input", "stats.json", "labels.zip"


def overlay_name() -> str:
    return "overlay" + encoder()[1]


@dataclass
class Job:
    """A job of this process: what the worker needs beside the record."""

    id: str
    folder: Path
    model: ServedModel
    alpha: float
    labels: bool
    record: dict
    cancel: threading.Event = field(default_factory=threading.Event)


class VideoJobs:
    """Accepts, runs, reports and deletes video jobs; see the module's docstring."""

    def __init__(self, settings):
        self.settings = settings
        self.root = Path(settings.results_dir)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[str, Job] = {}  # queued or running here
        self._lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._owner = uuid.uuid4().hex
        self._owner_file = None

    # --- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Take ownership, fail the jobs left unfinished by processes that are gone, prune, start the worker.

        Idempotent: an app whose lifespan is entered twice (a test client and a fuzzer on one app) gets one worker,
        so that one ``stop`` ends it instead of waiting on a second worker that never receives its end marker."""
        if self._thread is not None and self._thread.is_alive():
            return
        self.check_decoder()
        (self.root / "owners").mkdir(parents=True, exist_ok=True)
        self._owner_file = open(self.root / "owners" / f"{self._owner}.lock", "w")
        fcntl.flock(self._owner_file, fcntl.LOCK_EX)
        self.recover()
        self.prune()
        self._thread = threading.Thread(target=self._work, name="video-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the running job (it is recorded failed: the server stopped) and drop the queued ones likewise."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        for job in jobs:  # those the worker never reached
            if self._read(job.folder).get("state") in UNFINISHED:
                self._finish(job, "failed", error="the server stopped before the job finished; submit it again")
        if self._owner_file is not None:
            self._owner_file.close()
            (self.root / "owners" / f"{self._owner}.lock").unlink(missing_ok=True)

    def check_decoder(self) -> None:
        """``video_decode=cuda`` without a usable NVDEC stops the start here, in plain words; ``auto`` says once
        which decoder jobs get."""
        mode = self.settings.video_decode
        why = nvdec.problem() if mode != "cpu" else None
        if why is not None and mode == "cuda":
            raise RuntimeError(f"SEGMENT_VIDEO_DECODE=cuda, but {why}; set it to auto (NVDEC where it works) or cpu")
        if mode == "auto":
            log.info("video jobs decode %s", f"on the CPU: {why}" if why else "on the GPU (NVDEC) where the codec "
                                                                              "allows")

    def recover(self) -> int:
        """Mark failed every unfinished job whose owner process is gone; returns how many."""
        failed = 0
        for folder in self._folders():
            record = self._read(folder)
            if record.get("state") in UNFINISHED and not self._owner_alive(record.get("owner", "")):
                record.update(state="failed", finished=time.time(),
                              error="the server restarted before the job finished; submit it again")
                (folder / INPUT).unlink(missing_ok=True)
                self._write(folder, record)
                failed += 1
        for trash in self.root.glob(".deleted-*"):  # deletions cut short
            shutil.rmtree(trash, ignore_errors=True)
        for lock in (self.root / "owners").glob("*.lock"):  # owners that are gone
            if lock.stem != self._owner and not self._owner_alive(lock.stem):
                lock.unlink(missing_ok=True)
        if failed:
            log.warning("%d video job(s) left unfinished by a stopped server marked failed", failed)
        return failed

    def _owner_alive(self, owner: str) -> bool:
        if owner == self._owner:
            return True
        try:
            with open(self.root / "owners" / f"{owner}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
                return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    def prune(self) -> None:
        """Delete finished jobs beyond the count kept and older than the age kept (oldest first). Never raises (a
        sweep must not end the worker) and never runs twice at once (a sweep already running is enough)."""
        if not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._prune()
        except Exception:  # an unreadable folder or record: logged, and the next sweep tries again
            log.exception("sweeping old video jobs")
        finally:
            self._prune_lock.release()

    def _prune(self) -> None:
        s = self.settings
        finished = sorted(((r.get("finished") or 0, f) for f in self._folders()
                           if (r := self._read(f)).get("state") not in UNFINISHED), reverse=True)
        too_old = time.time() - s.results_max_age_h * 3600
        for rank, (when, folder) in enumerate(finished):
            if rank >= s.results_keep or when < too_old:
                try:
                    self._remove(folder)
                except OSError:  # never let a sweep end the worker; the next one tries again
                    log.exception("could not delete the old video job folder %s", folder)

    # --- requests ---------------------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """503 + Retry-After when ``video_queue`` jobs are already queued or running here."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:  # with the lock held
        if len(self._jobs) >= self.settings.video_queue:
            raise Busy(f"{len(self._jobs)} video jobs are queued or running, the limit; retry later", retry_after=30)

    def new_folder(self) -> tuple[str, Path]:
        """A fresh job id and its folder, for the upload to be written into before :meth:`submit`."""
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(parents=True)
        return job_id, folder

    def input_path(self, job_id: str) -> Path:
        return self.root / job_id / INPUT

    def submit(self, job_id: str, model: ServedModel, info: dict, alpha: float, labels: bool,
               filename: str | None) -> dict:
        """Queue a checked upload; the job holds ``model`` (acquired) and releases it when done."""
        folder = self.root / job_id
        record = {"id": job_id, "state": "queued", "created": time.time(), "started": None, "finished": None,
                  "frames_done": 0, "frames_total": info.get("frames"), "fps": None, "error": None,
                  "model": model.name, "decoder": None, "source": {**info, "filename": filename},
                  "options": {"alpha": alpha, "labels": labels}, "owner": self._owner}
        with self._lock:
            self._check_room()  # again: another upload may have been queued while this one arrived
            self._write(folder, record)
            job = self._jobs[job_id] = Job(job_id, folder, model.acquire(), alpha, labels, record)
        self._queue.put(job)
        # Old results go now, off the caller's thread (the API calls this from its event loop)
        threading.Thread(target=self.prune, name="video-sweep", daemon=True).start()
        return record

    def status(self, job_id: str) -> dict:
        folder = self._folder(job_id)
        record = self._read(folder)
        if not record:
            raise NotFound(f"no video job {job_id}")
        return record

    def result(self, job_id: str, what: str) -> Path:
        """The path of a finished job's ``video``, ``stats`` or ``labels`` file (404 while not there)."""
        record = self.status(job_id)
        name = {"video": overlay_name(), "stats": STATS, "labels": LABELS}[what]
        path = self._folder(job_id) / name
        if record["state"] != "done" or not path.is_file():
            raise NotFound(f"video job {job_id} has no {what} " + (
                "(it was not asked for)" if record["state"] == "done" else f"yet: it is {record['state']}"))
        return path

    def delete(self, job_id: str) -> None:
        """Cancel the job if it is queued or running, and delete its folder (at once: a running job stops at its
        next frame, in whichever process runs it)."""
        folder = self._folder(job_id)
        if not (folder / RECORD).is_file():
            raise NotFound(f"no video job {job_id}")
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.cancel.set()
        self._remove(folder)

    # --- the worker -------------------------------------------------------------------------------------------
    def _work(self) -> None:
        # Every tenth of the age kept (at most 10 minutes): an idle server still lets old results go.
        every = min(600.0, self.settings.results_max_age_h * 360)
        while True:
            try:
                job = self._queue.get(timeout=every)
            except queue.Empty:
                self.prune()
                continue
            if job is None:
                return
            try:
                if not job.cancel.is_set():
                    self._run(job)
            except Exception:  # never let one job end the worker
                log.exception("video job %s", job.id)
            finally:
                job.model.release()
                with self._lock:
                    self._jobs.pop(job.id, None)
            self.prune()

    def _run(self, job: Job) -> None:
        s = self.settings
        record = job.record
        record.update(state="running", started=time.time())
        if not self._write(job.folder, record):
            return
        last_write = 0.0

        def progress(p) -> None:
            nonlocal last_write
            record.update(frames_done=p.frames_done, fps=p.fps)
            if time.monotonic() - last_write > 0.5:  # the record on disk, twice a second
                last_write = time.monotonic()
                if not self._write(job.folder, record):
                    job.cancel.set()  # its folder was deleted by another process

        model = job.model
        batch = s.batch_max if model.batch_dynamic else 1
        try:
            container, record["decoder"] = open_decoding(job.folder / INPUT, s.video_decode)
            try:
                stats = process(model, container, job.folder / overlay_name(), alpha=job.alpha,
                                max_side=s.max_dynamic_side, batch=batch,
                                labels_zip=job.folder / LABELS if job.labels else None,
                                frames_total=record["frames_total"], max_frames=s.max_video_frames,
                                progress=progress, should_stop=job.cancel.is_set)
            finally:
                container.close()
            (job.folder / STATS).write_text(json.dumps({**stats.as_dict(), "model": model.name}))
            record.update(frames_total=len(stats.frames))
            self._finish(job, "done")
        except Stopped:
            if job.folder.exists():  # stopped by the server's shutdown, not by a DELETE
                self._finish(job, "failed", error="the server stopped before the job finished; submit it again")
        except ServiceError as exc:
            self._finish(job, "failed", error=exc.detail)
        except Exception as exc:
            log.exception("video job %s failed", job.id)
            self._finish(job, "failed", error=f"{exc.__class__.__name__}: {exc}")

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.record.update(state=state, finished=time.time(), error=error)
        (job.folder / INPUT).unlink(missing_ok=True)
        self._write(job.folder, job.record)

    # --- the folder -------------------------------------------------------------------------------------------
    def _folder(self, job_id: str) -> Path:
        try:
            return self.root / uuid.UUID(hex=job_id).hex
        except ValueError:
            raise NotFound(f"no video job {job_id}") from None

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [f for f in self.root.iterdir() if not f.name.startswith(".") and (f / RECORD).is_file()]

    @staticmethod
    def _read(folder: Path) -> dict:
        try:
            return json.loads((folder / RECORD).read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _write(folder: Path, record: dict) -> bool:
        """Replace the record atomically; False when the folder is gone (the job was deleted)."""
        tmp = folder / f"{RECORD}.{threading.get_ident()}.tmp"
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, folder / RECORD)
            return True
        except FileNotFoundError:
            return False

    def _remove(self, folder: Path) -> None:
        """Rename first (one atomic step: the job is gone for every reader), then delete the files."""
        trash = self.root / f".deleted-{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            folder.rename(trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
