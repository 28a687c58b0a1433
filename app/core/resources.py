"""Files the package carries (page templates, static files, the sample photo, the bundled models), found with
``importlib.resources`` so that a wheel install serves them as an editable checkout does."""

import logging
import os
import shutil
from importlib.resources import as_file, files
from pathlib import Path

from .config import is_uri

log = logging.getLogger("segment.resources")

WEB = files("app.web")
ASSETS = files("app.assets")


def web_dir(name: str) -> Path:
    """``templates`` or ``static``: a real folder (package data is installed as plain files)."""
    with as_file(WEB / name) as path:
        return Path(path)


def sample_image() -> Path:
    """The bundled 2048x1024 Cityscapes street photo (benchmarks and the builds' parity check read it)."""
    with as_file(ASSETS / "cityscapes_example.png") as path:
        return Path(path)


def bundled_models() -> Path:
    """The folder of models shipped inside the package (read-only: copied into a new repository)."""
    with as_file(ASSETS / "models") as path:
        return Path(path)


SEEDED = ".seeded"  # in a repository once the bundled models were copied in


def seed_repository(root: Path | str) -> bool:
    """Fill a missing or empty model repository (a fresh install, a new container volume) with the bundled models;
    True if it did. An object-store repository (a URI) is the operator's to fill.

    A folder with a model or any other visible file in it is left alone, and so is one seeded before (its
    ``.seeded`` marker), so a model the operator deleted does not come back, even after ``rm engines/*``. Other
    hidden files do not count: the control store (``.control.db``) and locks that another process of the service
    may create there first (a Ray model replica starting beside the ingress did, and the repository stayed
    empty). Each file is copied under a hidden name of this process and renamed, metadata before model, so a crash
    never lists a half-written model and two processes seeding at once each rename whole files."""
    if is_uri(root):
        return False
    root = Path(root)
    if (root / SEEDED).exists() or (root.exists() and any(not e.name.startswith(".") for e in root.iterdir())):
        return False
    root.mkdir(parents=True, exist_ok=True)
    bundled = sorted(bundled_models().iterdir(), key=lambda p: (p.suffix == ".onnx", p.name))
    for item in bundled:
        if item.suffix in (".onnx", ".json", ".md"):
            tmp = root / f".{item.name}.{os.getpid()}.seeding"
            shutil.copyfile(item, tmp)
            os.replace(tmp, root / item.name)
    (root / SEEDED).touch()
    log.info("filled the empty model repository %s with the bundled models", root)
    return True
