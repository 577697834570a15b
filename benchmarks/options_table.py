"""The README's options table, generated from ``RoutingConfig`` in cggr/config.py.

Each field of the dataclass is an annotated assignment followed by its docstring (a string literal); this
reads them with ``ast``, so the table says exactly what the source says and nothing restates a default by
hand. ``python -m benchmarks.report`` writes the table between the ``<!-- generated:options -->`` markers of
README.md (``--check`` fails when it is stale); ``python -m benchmarks.options_table`` prints it.
"""

from __future__ import annotations

if not __package__:  # run by path: this folder would shadow installed packages (benchmarks/__init__.py)
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.options_table")

import ast
import inspect
import json
import os
import re
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "cggr", "config.py")
CLASS = "RoutingConfig"


class Option(NamedTuple):
    name: str
    default: str  # the default as source text (``ast.unparse``)
    doc: str  # the field's docstring, cleaned (``inspect.cleandoc``)


def config_options(path: str = CONFIG) -> list[Option]:
    """Every field of ``RoutingConfig`` in source order, with its default and docstring.

    A field without a docstring is an error naming it: the table would have nothing to say about it.
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == CLASS), None)
    if cls is None:
        raise ValueError(f"{path} defines no class {CLASS}")
    options = []
    for node, after in zip(cls.body, cls.body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        if not (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            raise ValueError(f"{path}: {CLASS}.{name} has no docstring (a string literal on the lines after the "
                             "field); every option needs one, the README's options table is made from them")
        default = "(required)" if node.value is None else ast.unparse(node.value)
        options.append(Option(name, default, inspect.cleandoc(after.value.value)))
    return options


def _default_cell(source: str) -> str:
    """``'sparse'`` -> ``"sparse"`` (as a user writes it), numbers and None as they are."""
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return f"`{source}`"
    return f"`{json.dumps(value)}`" if isinstance(value, str) else f"`{source}`"


def markdown(doc: str) -> str:
    """A docstring as one Markdown table cell: reST roles and literals as code, one line, pipes escaped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: f"`{m.group(1)}`", doc)  # :func:`cggr.attach` -> `cggr.attach`
    text = text.replace("``", "`")
    text = " ".join(text.split())
    return text.replace("|", "\\|")


def options_table(path: str = CONFIG) -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for o in config_options(path):
        lines.append(f"| `{o.name}` | {_default_cell(o.default)} | {markdown(o.doc)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_table())
