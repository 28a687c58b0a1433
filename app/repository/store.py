"""The model repository on disk: every ONNX model and TensorRT engine in one folder, with its metadata."""

import os
import re
import tempfile
from pathlib import Path

import onnx

from ..core.errors import Conflict, MetadataError, ModelError, NotFound
from ..core.metadata import ModelMeta, load_meta, meta_path, save_meta, write_atomic
from ..engines import MODEL_SUFFIXES, ONNX_SUFFIXES, check_onnx_graph, load_model
from .control import pid_alive

STAGED_PREFIX = ".upload."  # staged uploads: .upload.<pid>.<random>.onnx (+ .json)
# ASCII letters and digits, then also '_' and '-', 64 at most; always matched whole (``fullmatch``: ``$`` would let a
# trailing newline through). No dots: a name becomes NAME.onnx / NAME.engine / NAME.json, and a dot would make
# "a.onnx" both a name and a file, or let a name end in a model suffix.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(name: str) -> str:
    """A model name: letters, digits, '_' and '-', so it can never be a path; the one check every route, the
    builds and the repository use."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelError(f"invalid model name {name!r}: use 1-64 letters, digits, '_' or '-' (no dots or slashes)")
    return name


def kind_of(path: Path) -> str:
    return "onnx" if path.suffix.lower() in ONNX_SUFFIXES else "tensorrt"


class ModelRepository:
    """Reads and writes ``root``; names map to ``root/NAME.onnx`` or ``root/NAME.engine`` (+ ``NAME.json``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _inside(self, path: Path) -> Path:
        if path.resolve().parent != self.root.resolve():  # a symlink leading out of the repository
            raise ModelError(f"{path.name} resolves outside the model repository")
        return path

    def path(self, name: str) -> Path:
        """The model file called ``name`` (a stem, or a file name with its suffix)."""
        suffix = next((s for s in MODEL_SUFFIXES if name.endswith(s)), "")
        check_name(name[: len(name) - len(suffix)])
        candidates = [self.root / name] if suffix else [self.root / f"{name}{s}" for s in MODEL_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file():
                return self._inside(candidate)
        raise NotFound(f"no model called {name!r} in the repository {self.root}")

    def ensure_free(self, name: str) -> None:
        """Raise :class:`Conflict` if any model file is already called ``name``."""
        if any((self.root / f"{name}{s}").exists() for s in MODEL_SUFFIXES):
            raise Conflict(f"a model called {name!r} already exists; delete it first or pick another name")

    def describe(self, path: Path) -> dict:
        """Name, kind, size and metadata of one model file."""
        try:
            meta, problem = load_meta(path).model_dump(), None
        except MetadataError as exc:
            meta, problem = None, str(exc)
        complete = kind_of(path) == "onnx" or (meta_path(path).exists() and bool((meta or {}).get("build")))
        return {"name": path.stem, "file": path.name, "kind": kind_of(path), "bytes": path.stat().st_size,
                "precision": (meta or {}).get("precision", "fp32"),
                "complete": complete, "problem": problem, "metadata": meta}

    def list(self) -> list[dict]:
        """Every model file, sorted by name; engines without build metadata are marked incomplete."""
        if not self.root.is_dir():
            return []
        files = [p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
                 and not p.name.startswith(".") and NAME_RE.fullmatch(p.stem)]
        return [self.describe(p) for p in sorted(files)]

    def delete(self, name: str) -> None:
        """Remove a model and its metadata."""
        path = self.path(name)
        path.unlink()
        meta_path(path).unlink(missing_ok=True)

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

