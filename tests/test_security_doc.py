"""docs/SECURITY.md stays true: every test it cites exists, every setting is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from koolbase_ota.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SECURITY = ROOT / "docs" / "SECURITY.md"
CITED = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_tests(path: Path) -> set[str]:
    """Every test function of a file, at module level or in a class."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_every_test_cited_in_security_md_exists() -> None:
    cited = CITED.findall(SECURITY.read_text())
    assert len(cited) > 50, "the table of cases lost its tests"
    missing = []
    for file, name in cited:
        path = ROOT / file
        if not path.is_file() or name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/SECURITY.md cites tests that do not exist: {missing}"


def test_every_limit_setting_in_security_md_is_a_setting() -> None:
    names = set(re.findall(r"KOOLBASE_OTA_([A-Z0-9_]+)", SECURITY.read_text()))
    assert names
    fields = {name.upper() for name in Settings.model_fields}
    assert names <= fields, names - fields


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("## The command line")]
    for name in Settings.model_fields:
        variable = name.upper() if name.startswith("aws_") else f"KOOLBASE_OTA_{name.upper()}"
        assert f"`{variable}`" in table, f"{variable} is not in the README's configuration table"
