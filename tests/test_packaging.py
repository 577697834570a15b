"""The distribution: ``cggr`` (the library) and ``cggr_lab`` (the harness) ship together; the library never
imports the harness except lazily in its command; the extras hold what the harness and benchmarks import."""

import ast
import os
import subprocess
import sys

import pytest
import setuptools

import cggr_lab

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def _names(requirements):
    """Distribution names of requirement strings (``name>=1`` -> ``name``)."""
    import re

    return [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements]


def test_both_packages_are_found():
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_packages(ROOT, include=find["include"], exclude=find.get("exclude", ()))
    assert "cggr" in found and "cggr_lab" in found
    assert not any(p.split(".")[0] in ("tests", "benchmarks", "examples") for p in found)


def test_extras():
    extras = {k: _names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    # What the harness checks before a command starts is exactly what its extra installs.
    assert sorted(extras[cggr_lab.EXTRA]) == sorted(cggr_lab.REQUIREMENTS)
    assert set(extras["demo"]) < set(extras["bench"]) and "liger-kernel" in extras["bench"]
    assert set(extras["demo"]) <= set(extras["test"]) and "liger-kernel" not in extras["test"]


def test_the_library_never_imports_the_harness():
    """Only cggr/cli.py imports cggr_lab, and only inside functions (a lazy import)."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "cggr")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read(), path)
            top_level = set(map(id, tree.body))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                    modules = [a.value for a in node.args if isinstance(a, ast.Constant)]
                    modules += ["cggr_lab" for a in node.args if isinstance(a, ast.JoinedStr)
                                and "cggr_lab" in ast.unparse(a)]
                else:
                    continue
                if any(m.split(".")[0] == "cggr_lab" for m in modules):
                    rel = os.path.relpath(path, ROOT)
                    if rel != os.path.join("cggr", "cli.py") or id(node) in top_level:
                        offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_importing_the_library_and_its_command_loads_no_harness():
    code = ("import sys, cggr, cggr.cli, cggr.integrations, cggr.env_report\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cggr_lab'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
