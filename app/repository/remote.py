"""A model repository at an fsspec URI (``s3://``, ``gs://``, ``file://``, ``memory://``), read through a local cache.

The remote side is read-only here: models are put there with the object store's own tools. Listing reads the
remote folder (at most every ``LISTING_TTL_S``) and keeps a copy of each model's metadata JSON in the cache; a model
file is fetched when a worker or replica loads it, checked against the ``sha256`` its metadata records (a cached
copy that does not match is fetched again; a remote file that does not match is refused, never served), and
written under a temporary name then renamed, so a half file is never in the cache under a model's name.
"""

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..core.config import Settings, check_uri, is_uri
from ..core.errors import Conflict, ModelError, ServiceError, Unavailable
from ..core.metadata import load_meta, meta_path, sha256_file, write_atomic
from .store import STAGED_PREFIX, ModelRepository, split_file

log = logging.getLogger("segment.repository")

LISTING_TTL_S = 5.0  # how stale a listing may be: a request path asks for it, so not every call goes remote


def open_repository(settings: Settings) -> ModelRepository:
    """The model repository ``engines_dir`` names."""
    return repository_at(settings.engines_dir, settings.model_cache_dir)


def repository_at(location: Path | str, cache_dir: Path) -> ModelRepository:
    """A folder's repository, or a URI's read through ``cache_dir`` (an unknown scheme: ValueError saying so)."""
    if is_uri(location):
        return RemoteRepository(check_uri(location), cache_dir)
    return ModelRepository(Path(location))


class RemoteRepository(ModelRepository):
    """The repository at ``uri``; ``root`` is its cache folder (``cache_dir/<hash of the URI>``), where the
    metadata and the fetched model files live under their remote names."""

    def __init__(self, uri: str, cache_dir: Path):
        import fsspec  # only for a URI: a folder never imports it

        self.uri = uri
        self.fs, self.base = fsspec.core.url_to_fs(uri)
        super().__init__(Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16])
        self._lock = threading.Lock()
        self._listing: dict[str, int] = {}
        self._listed_at = float("-inf")
        self._seen: dict[str, str] = {}  # metadata file -> the remote listing entry it was copied from

    @property
    def location(self) -> str:
        return self.uri

    def listing(self) -> dict[str, int]:
        """The remote model files with their sizes; their metadata copied into the cache when it changed."""
        with self._lock:
            if time.monotonic() - self._listed_at < LISTING_TTL_S:
                return dict(self._listing)
            self.root.mkdir(parents=True, exist_ok=True)
            self.fs.invalidate_cache(self.base)  # s3fs/gcsfs keep listings forever otherwise: new models never show
            with self._reaching():
                try:
                    entries = self.fs.ls(self.base, detail=True)
                except FileNotFoundError:
                    entries = []
            infos = {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") == "file"}
            listing = {f: int(info["size"]) for f, info in infos.items() if split_file(f)}
            for file in listing:
                meta = meta_path(Path(file), exists=lambda p: p.name in infos).name  # as the store names it
                local, info = meta_path(self.root / file, exists=lambda p: False), infos.get(meta)  # the cache: its own
                if info is None:
                    local.unlink(missing_ok=True)
                    continue
                seen = json.dumps(info, sort_keys=True, default=str)  # size, mtime / ETag: changed or not
                if self._seen.get(meta) != seen or not local.exists():
                    with self._reaching():
                        write_atomic(local, self.fs.cat_file(info["name"]))
                    self._seen[meta] = seen
            self._listing, self._listed_at = listing, time.monotonic()
            return dict(listing)

    def describe(self, path: Path, size: int | None = None) -> dict:
        """As a local one's, the size the remote file's (the cache may not hold it)."""
        return super().describe(path, self.listing().get(path.name, 0) if size is None else size)

    def local_path(self, name: str) -> Path:
        """The file to load here, fetched into the cache and checked against its recorded sha256."""
        return self.fetch(super().local_path(name).name)

    @contextmanager
    def _reaching(self):
        """The store's own errors (botocore's, gcsfs's, aiohttp's: not all are OSError) as a 503 saying which store."""
        try:
            yield
        except (ServiceError, FileNotFoundError):
            raise
        except Exception as exc:
            raise Unavailable(f"cannot read the model repository {self.uri}: {exc.__class__.__name__}: {exc}") from exc

    def fetch(self, file: str, relisted: bool = False) -> Path:
        """``file`` in the cache, matching the sha256 its metadata records: a cached copy that does not match is
        fetched again; a remote file that does not match is refused (:class:`ModelError`, the model ``failed``),
        after one fresh read of its metadata (a model replaced within the listing's few seconds is not refused)."""
        local = self.root / file
        want = load_meta(local).sha256
        if not want:
            raise ModelError(f"{file} in {self.uri} has no sha256 in its metadata ({meta_path(local).name}), so a "
                             "fetched copy cannot be checked: record it with `segment engines DIR --stamp-sha256` "
                             "before uploading")
        if local.is_file():
            if sha256_file(local) == want:
                return local
            log.warning("the cached %s does not match its sha256; fetching it again from %s", file, self.uri)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{STAGED_PREFIX}{os.getpid()}.", suffix=".fetch")
        os.close(fd)
        try:
            with self._reaching():
                self.fs.get_file(posixpath.join(self.base, file), tmp)
            got = sha256_file(Path(tmp))
            if got != want and not relisted:
                with self._lock:
                    self._listed_at = float("-inf")
                self.listing()
                return self.fetch(file, relisted=True)
            if got != want:
                raise ModelError(f"{self.uri}/{file} does not match the sha256 its metadata records ({want[:16]}..., "
                                 f"the file has {got[:16]}...): refused, not served")
            os.chmod(tmp, 0o644)
            os.replace(tmp, local)
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.info("fetched %s from %s (%d bytes, sha256 checked)", file, self.uri, local.stat().st_size)
        return local

    def _read_only(self, *_args, **_kwargs):
        raise Conflict(f"the model repository {self.uri} is read-only here: add, build and delete models with the "
                       "object store's own tools (and their metadata, with its sha256)")

    check_writable = ensure_free = temp_upload = delete = stamp_sha256 = _read_only
