"""`make run` installs requirements.lock and the package without its dependencies: whatever the
server imports must be pinned there, not only in the dev lock the tests run with (uvicorn, the
default server, was only in the dev extras, so `make run` on a fresh machine failed with
ModuleNotFoundError while every test passed)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "koolbase_ota"
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", re.MULTILINE)


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> set[str]:
    """The top-level names every module of the package imports."""
    names: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_module_the_server_imports_is_pinned_in_the_runtime_lock() -> None:
    pinned = {
        _normalised(name) for name in PINNED.findall((ROOT / "requirements.lock").read_text())
    }
    providers = importlib.metadata.packages_distributions()
    third_party = _imported_modules() - set(sys.stdlib_module_names) - {"koolbase_ota"}
    assert "uvicorn" in third_party  # the check below sees the imports it is about
    unpinned = {
        module: providers.get(module, [module])
        for module in sorted(third_party)
        if not any(_normalised(dist) in pinned for dist in providers.get(module, [module]))
    }
    assert not unpinned, f"imported by the server but not in requirements.lock: {unpinned}"
