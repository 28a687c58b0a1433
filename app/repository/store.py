"""The model repository on disk: every ONNX model and TensorRT engine in one folder, with its metadata."""

import os
import re
import tempfile
from pathlib import Path

import onnx

from ..core.errors import Conflict, MetadataError, ModelError, NotFound
from ..core.metadata import ModelMeta, load_meta, meta_path, save_meta, sha256_file, write_atomic
from ..engines import ENGINE_SUFFIXES, MODEL_SUFFIXES, ONNX_SUFFIXES, check_onnx_graph, load_model
from ..engines.tensorrt import built_for, choose_engine, local_gpu
from .control import pid_alive

STAGED_PREFIX = ".upload."  # staged uploads: .upload.<pid>.<random>.onnx (+ .json)
# ASCII letters and digits, then also '_' and '-', 64 at most; always matched whole (``fullmatch``: ``$`` would let a
# trailing newline through). No dots: a name becomes NAME.onnx / NAME.engine / NAME.json, and a dot would make
# "a.onnx" both a name and a file, or let a name end in a model suffix.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
KIND_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")  # the GPU kind in NAME.<gpu-kind>.engine


def check_name(name: str) -> str:
    """A model name: letters, digits, '_' and '-', so it can never be a path; the one check every route, the
    builds and the repository use."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelError(f"invalid model name {name!r}: use 1-64 letters, digits, '_' or '-' (no dots or slashes)")
    return name


def kind_of(path: Path) -> str:
    return "onnx" if path.suffix.lower() in ONNX_SUFFIXES else "tensorrt"


def split_file(file: str) -> tuple[str, str] | None:
    """``(name, kind)`` of a model file name: ``NAME.onnx`` and ``NAME.engine`` have the kind ``""``; an engine may
    carry the GPU kind it was built for, ``NAME.<gpu-kind>.engine`` (e.g. ``camvid.nvidia-h100.sm90.trt10-3.engine``).
    None for anything else (hidden and staged files, metadata)."""
    suffix = next((s for s in MODEL_SUFFIXES if file.lower().endswith(s)), None)
    if suffix is None:
        return None
    name, _, kind = file[: -len(suffix)].partition(".")
    if not NAME_RE.fullmatch(name) or (kind and (suffix not in ENGINE_SUFFIXES or not KIND_RE.fullmatch(kind))):
        return None
    return name, kind


class ModelRepository:
    """Reads and writes ``root``; names map to ``root/NAME.onnx`` or ``root/NAME.engine`` (+ ``NAME.json``), or to
    several engines of one model for different GPU kinds, ``root/NAME.<gpu-kind>.engine``, of which the one built
    for this node's GPU and TensorRT is loaded."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _inside(self, path: Path) -> Path:
        if path.resolve().parent != self.root.resolve():  # a symlink leading out of the repository
            raise ModelError(f"{path.name} resolves outside the model repository")
        return path

    def listing(self) -> dict[str, int]:
        """Every model file by file name, with its size in bytes."""
        if not self.root.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.root.iterdir() if p.is_file() and split_file(p.name)}

    def files(self, name: str, listing: dict[str, int] | None = None) -> list[str]:
        """The files of the model ``name`` (a stem, or a file name with its suffix); 404 when there are none. The
        ONNX file comes first (it is the one served when both exist)."""
        listing = self.listing() if listing is None else listing
        if any(name.lower().endswith(s) for s in MODEL_SUFFIXES):  # one file, named with its suffix
            if split_file(name) is None:
                check_name(name.rsplit(".", 1)[0])  # says what is wrong with the name
                raise ModelError(f"invalid model file name {name!r}")
            if name not in listing:
                raise NotFound(f"no model file {name!r} in the repository {self.location}")
            return [name]
        check_name(name)
        order = {s: i for i, s in enumerate(MODEL_SUFFIXES)}
        found = sorted((f for f in listing if split_file(f)[0] == name),
                       key=lambda f: (order[Path(f).suffix.lower()], f))
        if not found:
            raise NotFound(f"no model called {name!r} in the repository {self.location}")
        return found

    @property
    def location(self) -> str:
        return str(self.root)

    def path(self, name: str) -> Path:
        """The model file called ``name`` (a stem, or a file name with its suffix); of several engines, the first."""
        return self._inside(self.root / self.files(name)[0])

    def local_path(self, name: str) -> Path:
        """The file to load on this node: of several engines, the one built for its GPU and TensorRT
        (:class:`IncompatibleEngine`, 409, saying why when none is)."""
        files = self.files(name)
        if len(files) > 1 and kind_of(Path(files[0])) == "tensorrt":
            return self._inside(self.root / choose_engine(self._builds(files), local_gpu()))
        return self._inside(self.root / files[0])

    def _builds(self, files: "list[str]") -> dict[str, dict]:
        """The build record of each of ``files`` whose metadata reads (empty when it has none)."""
        builds = {}
        for f in files:
            try:
                meta = load_meta(self.root / f)
            except MetadataError:
                continue
            builds[f] = meta.build.model_dump() if meta.build else {}
        return builds

    def check_writable(self) -> None:
        """Nothing here; a remote repository raises :class:`Conflict` (it is read-only through the service)."""

    def ensure_free(self, name: str) -> None:
        """Raise :class:`Conflict` if any model file is already called ``name``."""
        try:
            self.files(name)
        except NotFound:
            return
        raise Conflict(f"a model called {name!r} already exists; delete it first or pick another name")

    def describe(self, path: Path, size: int | None = None) -> dict:
        """Name, kind, size and metadata of one model file."""
        try:
            meta, problem = load_meta(path).model_dump(), None
        except MetadataError as exc:
            meta, problem = None, str(exc)
        complete = kind_of(path) == "onnx" or (meta_path(path).exists() and bool((meta or {}).get("build")))
        return {"name": split_file(path.name)[0], "file": path.name, "kind": kind_of(path),
                "bytes": path.stat().st_size if size is None else size,
                "precision": (meta or {}).get("precision", "fp32"),
                "complete": complete, "problem": problem, "metadata": meta}

    def list(self) -> list[dict]:
        """Every model, sorted by name; engines without build metadata are marked incomplete. A model of several
        files (engines for several GPU kinds, or an engine beside its ONNX source) is one entry (the ONNX, else its
        first engine), with ``engines`` naming each engine and what it was built for."""
        listing = self.listing()
        entries = []
        for name in sorted({split_file(f)[0] for f in listing}):
            files = self.files(name, listing)
            entry = self.describe(self.root / files[0], listing[files[0]])
            engines = [f for f in files if kind_of(Path(f)) == "tensorrt"]
            if len(files) > 1 and engines:  # several GPU kinds, or an engine beside its ONNX (`m.onnx m.trt`)
                builds = self._builds(engines)
                entry["engines"] = [{"file": f, "built_for": built_for(builds.get(f, {}))} for f in engines]
            entries.append(entry)
        return entries

    def stamp_sha256(self) -> "list[str]":
        """Record each model file's sha256 in its metadata where it is missing or stale (before the folder is copied
        to an object store, whose copies are checked against it); the files whose metadata changed."""
        stamped = []
        for file in self.listing():
            path = self.root / file
            meta, digest = load_meta(path), sha256_file(path)
            if meta.sha256 != digest:
                save_meta(path, meta.model_copy(update={"sha256": digest}))
                stamped.append(file)
        return stamped

    def delete(self, name: str) -> "list[str]":
        """Remove a model (every engine of it) and its metadata; the model files removed."""
        files = self.files(name)
        for file in files:
            path = self._inside(self.root / file)
            path.unlink()
            meta_path(path).unlink(missing_ok=True)
        return files

    def temp_upload(self, suffix: str = ".onnx") -> Path:
        """A fresh hidden file in the repository for an upload in progress (same file system: atomic rename).
        Its name carries this process's id, so :meth:`clean_staged` knows when its writer is gone."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f"{STAGED_PREFIX}{os.getpid()}.", suffix=suffix)
        os.close(fd)
        return Path(tmp)

    def clean_staged(self) -> "list[str]":
        """Remove staged uploads (and their metadata) left by processes that died mid-registration; those of live
        processes (another worker's upload in progress) stay."""
        removed = []
        for path in self.root.glob(f"{STAGED_PREFIX}*") if self.root.is_dir() else ():
            pid = path.name[len(STAGED_PREFIX):].split(".", 1)[0]
            if not pid.isdigit() or not pid_alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def register_onnx(self, name: str, staged: Path, meta: ModelMeta | None = None) -> dict:
        """Validate a staged ONNX file (checker, refusal rules, dry run) and move it in as ``name``."""
        check_name(name)
        target = self.root / f"{name}.onnx"
        self.ensure_free(name)
        try:
            onnx.checker.check_model(str(staged))
        except Exception as exc:  # checker raises ValidationError, protobuf DecodeError, ...
            raise ModelError(f"not a valid ONNX model: {str(exc).splitlines()[0][:300]}") from exc
        check_onnx_graph(staged)
        if meta is not None:
            meta = meta.model_copy(update={"sha256": sha256_file(staged)})
            save_meta(staged, meta)  # so the dry run reads it
        try:
            load_model(staged).close()  # dry run
            # Atomic as a whole: a model is listed once NAME.onnx exists, so its metadata goes first (a metadata
            # file with no model is never listed), and one rename publishes the model.
            if meta is not None:
                write_atomic(meta_path(target), meta_path(staged).read_bytes())
            else:
                meta_path(target).unlink(missing_ok=True)  # never adopt a stale NAME.json
            os.replace(staged, target)
        finally:
            meta_path(staged).unlink(missing_ok=True)
        return self.describe(target)

