"""The docs that describe code are checked against it, so they cannot drift."""

import re

from app.core.config import Settings

from .models import ROOT


def test_configuration_doc_lists_every_setting():
    documented = set(re.findall(r"^\| `SEGMENT_([A-Z0-9_]+)` \|", (ROOT / "docs" / "configuration.md").read_text(), re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from docs/configuration.md"
    assert documented - fields == set(), "docs/configuration.md lists settings that do not exist"


def test_readme_is_a_front_door_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    head = "\n".join(readme.splitlines()[:40])
    assert "pip install" in head and "segment serve" in head and "python -m pytest -q" in head
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), f"README links to a missing {link}"
