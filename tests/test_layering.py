"""The library's layering (docs/design.md §2): its imports go one way (no module of ``cggr/`` imports, even inside a
function, a module that imports it back, directly or through others; every module imports on its own in a fresh
interpreter), and no module keeps mutable state that carries data from one stage to another at run time."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(root: str, package: str) -> dict[str, str]:
    """Every module of ``package`` under ``root``: dotted name -> file (a package by its ``__init__.py``)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def import_graph(root: str, package: str = "cggr") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, at the top level or inside a function alike.

    ``from . import x`` counts as importing the submodule ``x`` where there is one, else the package itself
    (a name its ``__init__`` defines). Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those
    implicit edges to a module's own ancestors are not counted (every submodule has them, and Python handles a
    package that is being initialised), explicit imports of a package are.
    """
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in wanted:
                while target not in modules and "." in target:  # ``import a.b.func``-like: the module holding it
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of ``graph`` once, as the path ``[a, b, ..., a]`` found by a depth-first search."""
    circles, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return circles


def test_the_library_has_no_import_circle():
    graph = import_graph(ROOT)
    assert len(graph) > 40 and graph["cggr.router"] >= {"cggr.install", "cggr.plan", "cggr.routing"}
    circles = import_circles(graph)
    assert not circles, "import circles (function-level imports count): " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_imports_inside_functions(tmp_path):
    """The check itself: a circle closed only by an import inside a function is found, one of packages too."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("import os\nfrom .sub import g\n")
    (pkg / "sub" / "__init__.py").write_text("def g():\n    from ..c import os\n")
    (pkg / "sub" / "leaf.py").write_text("from .. import c\nfrom . import g\n")
    graph = import_graph(str(tmp_path), "pkg")
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.sub.leaf"] == {"pkg.c", "pkg.sub"}
    assert sorted(map(tuple, import_circles(graph))) == [("pkg.a", "pkg.b", "pkg.a"), ("pkg.c", "pkg.sub", "pkg.c")]


def test_every_module_imports_on_its_own():
    """Each module of cggr/ imported first, in a fresh set of cggr modules (one interpreter, torch loaded once):
    an import circle closed at the top level fails here whichever module a user imports first."""
    names = sorted(n for n in _modules(ROOT, "cggr") if not n.endswith("__main__"))  # __main__ runs the command
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for loaded in [m for m in sys.modules if m == 'cggr' or m.startswith('cggr.')]:\n"
            "        del sys.modules[loaded]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as e:\n"
            "        print(f'{name}: {type(e).__name__}: {e}')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", done.stdout


# Module-level names a module of cggr/ changes after import, and why each may: caches, warn-once flags and the
# attach-time check's switch, none of which carries data from one stage of a step to another. Anything new here is
# a channel around the stages (the fused loss's scores once went to the router through such a list): pass the
# object instead (docs/design.md §2).
ALLOWED_MODULE_STATE = {
    "cggr.compact.verify": {"_verdicts", "_by_block", "_warned"},  # verdicts of the attach-time check; warn once
    "cggr.compact.pointwise": {"_eager_only"},  # while that check runs, nothing is compiled for its shapes
    "cggr.compact.forward": {"_warned_dtype"},  # warn once per process
    "cggr.compact.graphs": {"_STAGES"},  # the captured CUDA graphs, one cache per compiled stage
    "cggr.router": {"_LIVE_ROUTERS"},  # attach refuses a second router on a nested module (weak references)
    "cggr.integrations": {"globals()"},  # a lazily imported callback, kept once looked up
}

_MUTATORS = {"append", "add", "update", "clear", "pop", "popitem", "remove", "discard", "setdefault", "extend",
             "insert"}


def mutated_module_state(path: str) -> set[str]:
    """Module-level names of the file that its code changes after import: rebound through ``global``, mutated by a
    container method (``.append``, ``.add``, ``[k] = v``, ...) or ``globals()[k] = v``."""
    tree = ast.parse(open(path).read(), path)
    top = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found |= set(node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS
              and isinstance(node.func.value, ast.Name) and node.func.value.id in top):
            found.add(node.func.value.id)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in top:
                    found.add(t.value.id)
                if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Call)
                        and getattr(t.value.func, "id", None) == "globals"):
                    found.add("globals()")
    return found


def test_no_module_keeps_state_between_stages():
    found = {name: state for name, path in _modules(ROOT, "cggr").items() if (state := mutated_module_state(path))}
    assert found == ALLOWED_MODULE_STATE


def test_the_module_state_check_sees_each_kind_of_change(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import functools\n_sinks = []\n_seen = set()\n_flag = False\n_table = {}\nTABLE = {1: 2}\n"
                      "def f(x):\n    global _flag\n    _flag = True\n    _sinks.append(x)\n    _seen.add(x)\n"
                      "    _table[x] = 1\n    globals()['y'] = x\n    return TABLE[x]\n")
    assert mutated_module_state(str(source)) == {"_sinks", "_seen", "_flag", "_table", "globals()"}
