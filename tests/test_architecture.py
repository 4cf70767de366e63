"""The shape of the code: the import layers (lint-imports, as `make test` runs it), no private name used across
modules, files short enough to read, and a README that stays a front page."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gen_dist"
MAX_LINES = 500
README_LINES = 250


def _module_name(path: Path) -> str:
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private_uses(path: Path) -> list[str]:
    """`from gen_dist.x import _y`, and `x._y` where x names an imported gen_dist module, in one file."""
    tree = ast.parse(path.read_text())
    here = _module_name(path)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gen_dist"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{here}:{node.lineno} imports {node.module}.{alias.name}")
                elif node.module == "gen_dist" or (PACKAGE / Path(*node.module.split(".")[1:]) / alias.name).exists():
                    modules.add(alias.asname or alias.name)  # a module of gen_dist bound to a name
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("gen_dist"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{here}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_a_private_name_of_another() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    assert [f for path in files for f in _private_uses(path)] == []


def test_the_private_name_check_finds_one(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from gen_dist.dist import _reduce_stats\nfrom gen_dist import monitor\nmonitor._session\n")
    assert len(_private_uses(probe)) == 2


def test_files_stay_short_and_the_readme_a_front_page() -> None:
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert long == {}
    assert len((ROOT / "README.md").read_text().splitlines()) <= README_LINES


def test_import_layers_hold() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    proc = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "gen_dist layers KEPT" in proc.stdout and "no import cycles inside a package KEPT" in proc.stdout
