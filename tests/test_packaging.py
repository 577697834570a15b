"""The distribution: ``cggr`` (the library) and ``cggr_lab`` (the harness) ship together; the library never
imports the harness except lazily in its command; the extras hold what the harness and benchmarks import; each
declared lower bound is a version CI runs the suite with (.ci/lowest.txt); no module of the checkout can shadow an
installed package."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import cggr_lab

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
LOWEST = os.path.join(ROOT, ".ci", "lowest.txt")


def _names(requirements):
    """Distribution names of requirement strings (``name>=1`` -> ``name``)."""
    return [canonicalize_name(Requirement(r).name) for r in requirements]


def _declared() -> dict[str, list[Requirement]]:
    """The requirements pyproject.toml declares: ``dependencies`` and each extra by its name."""
    project = PYPROJECT["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {group: [Requirement(r) for r in reqs] for group, reqs in groups.items()}


def _lowest_pins() -> dict[str, Version]:
    """.ci/lowest.txt: each distribution it pins (``name==version``, one a line, ``#`` comments) and its version."""
    pins = {}
    for no, line in enumerate(open(LOWEST), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and name.strip() and version.strip(), f".ci/lowest.txt:{no}: not name==version: {line!r}"
            pins[canonicalize_name(name.strip())] = Version(version.strip())
    return pins


def _lower_bound(req: Requirement) -> Version:
    bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"{req}: declares no single lower bound (>=)"
    return bounds[0]


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
    # Liger-Kernel's patches run in the suite under Triton's interpreter (tests/test_liger.py).
    assert set(extras["demo"]) <= set(extras["test"]) and "liger-kernel" in extras["test"]


def test_every_requirement_declares_one_lower_bound():
    for reqs in _declared().values():
        for req in reqs:
            _lower_bound(req)


def test_the_lowest_pins_are_the_declared_lower_bounds():
    """Each requirement, in ``dependencies`` and in every extra, on a package .ci/lowest.txt pins has that pin
    as its lower bound and admits it (any upper bound above it): the extras agree with each other and with the
    versions CI's lowest run installs."""
    pins = _lowest_pins()
    for group, reqs in _declared().items():
        for req in reqs:
            name = canonicalize_name(req.name)
            if name in pins:
                assert _lower_bound(req) == pins[name], f"[{group}] {req}: .ci/lowest.txt pins {name}=={pins[name]}"
                assert req.specifier.contains(pins[name], prereleases=True), f"[{group}] {req}: pinned {pins[name]}"


def test_the_lowest_run_pins_every_package_the_test_command_installs():
    """CI's second run is the README's command (torch and ``.[test]``) under .ci/lowest.txt: each package it
    installs by name is pinned there, so every such lower bound is a version the suite ran with. Torch is the
    exception: the command pins its CPU build (2.13), and its lower bound is the GPU machine's torch (2.11), where
    the GPU checks run. A package of another extra only (bench's liger-kernel) is not installed by the suite."""
    pins, declared = _lowest_pins(), _declared()
    installed = {canonicalize_name(r.name) for r in declared["dependencies"] + declared["test"]}
    assert "torch" in installed and "torch" not in pins
    assert installed - {"torch"} <= set(pins), f"not pinned by .ci/lowest.txt: {installed - {'torch'} - set(pins)}"


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


def _checkout_module_names() -> dict[str, str]:
    """Every top-level module name the checkout can put first on ``sys.path``, with where it comes from: the
    root's packages, folders of modules and ``.py`` files (``python -m pytest`` and ``python -m benchmarks.X``
    run from the root), and the scripts of ``examples/`` (run by path, so their folder comes first)."""
    names = {}
    for entry in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, entry)
        if entry.startswith(".") or entry in ("build", "dist") or entry.endswith(".egg-info"):
            continue
        if entry.endswith(".py"):
            names[entry[:-3]] = entry
        elif os.path.isdir(path) and any(f.endswith(".py") for f in os.listdir(path)):
            names[entry] = entry + "/"
    for script in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if script.endswith(".py"):
            names[script[:-3]] = f"examples/{script}"
    return names


def test_no_module_of_the_checkout_shadows_an_installed_package():
    """A module of ours named like an installed package hides it from everything in the process (benchmarks/
    kernels.py once hid Hugging Face's ``kernels`` from transformers, and no model could be built)."""
    names = _checkout_module_names()
    assert {"cggr", "cggr_lab", "benchmarks", "tests", "hf_trainer"} <= set(names)
    installed = importlib.metadata.packages_distributions()  # import name -> distributions that ship it
    clashes = {f"{where} ({name})": installed[name] for name, where in names.items()
               if set(installed.get(name, ())) - {"cggr"}}
    assert not clashes, f"modules of the checkout named like installed packages: {clashes}"


def test_nothing_puts_a_folder_of_the_checkout_on_sys_path():
    """Code and tests import through packages (``from tests.tiny import ...``, ``python -m benchmarks.speed``):
    a folder of the checkout inserted ahead of site-packages makes each of its files a top-level name."""
    offenders = []
    for top in ("cggr", "cggr_lab", "benchmarks", "tests", "examples"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    for no, line in enumerate(open(path), 1):
                        if re.search(r"sys\.path\s*(\.(insert|append|extend)|\[|\+?=)", line):
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{no}")
    assert not offenders, offenders
    root = os.path.realpath(ROOT)
    inside = [p for p in sys.path if p and os.path.realpath(p).startswith(root + os.sep)]
    assert not inside, f"folders of the checkout on sys.path in this test run: {inside}"


def test_benchmark_scripts_refuse_to_run_by_path():
    """``python benchmarks/speed.py`` would put benchmarks/ first on the path: each script says how to run it."""
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and f != "__init__.py")
    assert {"speed.py", "report.py", "kernels.py"} <= set(scripts)
    for script in scripts:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and f"python -m benchmarks.{script[:-3]}" in done.stderr, (script, done.stderr)
