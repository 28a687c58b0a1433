"""The import rule of the layered tree (docs/architecture.md): each package of ``app/`` imports only the packages
below it, so the tree has no circle and nothing reaches up."""

import ast
from pathlib import Path

from .models import ROOT

APP = ROOT / "app"
# Each layer and the app packages it may import (besides itself). Top to bottom.
ALLOWED = {
    "cli": {"cluster", "api", "builds", "bisenet", "client", "serving", "repository", "engines", "core"},
    "cluster": {"main", "api", "builds", "serving", "repository", "engines", "core"},  # Ray Serve mode
    "main": {"api", "builds", "serving", "core"},
    "api": {"builds", "serving", "repository", "engines", "core"},
    "builds": {"serving", "repository", "engines", "core"},
    "bisenet": {"core"},
    "client": {"core"},  # the Python client: it runs where the service's code does not
    "serving": {"repository", "engines", "core"},
    "repository": {"engines", "core"},
    "engines": {"core"},
    "core": set(),
    "web": set(), "assets": set(),
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(APP)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    """The app packages a module imports, at any depth (in-function imports count too)."""
    here = path.relative_to(ROOT).with_suffix("").parts[:-1]  # the module's package, as a tuple
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [target] if node.module else [(*target, a.name) for a in node.names]
            else:
                names = [tuple(node.module.split("."))] if node.module else []
        elif isinstance(node, ast.Import):
            names = [tuple(a.name.split(".")) for a in node.names]
        else:
            continue
        for name in names:
            if len(name) >= 2 and name[0] == "app":
                found.add(name[1])
    return found


def test_every_module_imports_only_layers_below_it():
    wrong = []
    for path in sorted(APP.rglob("*.py")):
        layer = layer_of(path)
        assert layer in ALLOWED or layer == "__init__", f"{path}: a module outside the known layers"
        for other in imported_layers(path) - {layer}:
            if layer != "__init__" and other not in ALLOWED.get(layer, set()):
                wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports app.{other}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_itself_has_no_circle():
    seen, order = set(), []

    def visit(layer, stack):
        assert layer not in stack, f"circle: {' -> '.join((*stack, layer))}"
        if layer in seen:
            return
        for below in ALLOWED[layer]:
            visit(below, (*stack, layer))
        seen.add(layer)

    for layer in ALLOWED:
        visit(layer, ())


def test_the_check_sees_a_wrong_import(tmp_path):
    """The AST walk finds relative and absolute imports, in functions too (so the test above can fail)."""
    module = APP / "engines" / "_probe_layer_check.py"
    module.write_text("def f():\n    from ..serving import pipeline\n    import app.api.deps\n")
    try:
        assert imported_layers(module) == {"serving", "api"}
    finally:
        module.unlink()
