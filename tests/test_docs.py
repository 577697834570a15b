"""The documentation cites only what the repository holds, and the README's options table is RoutingConfig's."""

import dataclasses
import json
import os
import re

from tests.doclinks import ROOT, WRITTEN_ON_OTHER_BRANCHES, repository_text_files

# The team's brief outside the repository, once cited by code as its design document (spelt in two parts here,
# so that this file does not cite it).
OUTSIDE_BRIEF = "DESIGN" + ".md"


def test_no_file_cites_a_document_the_repository_does_not_contain():
    files = repository_text_files()
    assert "cggr/router.py" in files and "docs/design.md" in files
    brief, missing = [], []
    for rel in files:
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            text = f.read()
        for no, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_BRIEF in line:
                brief.append(f"{rel}:{no}")
            for path in re.findall(r"(?<![\w/.-])(docs/[\w./-]+?\.md)\b", line):
                if not os.path.exists(os.path.join(ROOT, path)) and path not in WRITTEN_ON_OTHER_BRANCHES:
                    missing.append(f"{rel}:{no}: {path}")
    assert not brief, f"cite docs/design.md (with its section) instead of the brief outside the repository: {brief}"
    assert not missing, missing


def _design_sections() -> set[str]:
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", f.read(), flags=re.M))


def test_every_cited_section_of_the_design_exists():
    """``docs/design.md §1.8`` (or ``§1.4, §1.5``, ``§1.4 and §1.5``) names a numbered heading of the design."""
    sections = _design_sections()
    assert {"1", "1.1", "1.8", "1.13", "2", "3.3", "4", "5"} <= sections
    cited, unknown = 0, []
    for rel in repository_text_files():
        with open(os.path.join(ROOT, rel), errors="replace") as f:
            text = f.read()
        for m in re.finditer(r"docs/design\.md((?:(?:,|\s+and)?\s*§\d+(?:\.\d+)*)+)", text):
            for number in re.findall(r"§(\d+(?:\.\d+)*)", m.group(1)):
                cited += 1
                if number not in sections:
                    unknown.append(f"{rel}: docs/design.md §{number}")
    assert cited >= 20, cited  # the code's citations are found at all
    assert not unknown, unknown


def _readme_options_rows() -> list[list[str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    body = text.split("<!-- generated:options -->\n", 1)[1].split("<!-- /generated:options -->", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_readme_options_table_is_every_field_of_routing_config():
    """Names, order and defaults against the dataclass itself (the generator reads the source with ast); each
    row's meaning is the field's docstring, non-empty."""
    from cggr.config import RoutingConfig

    rows = _readme_options_rows()
    fields = dataclasses.fields(RoutingConfig)
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in fields]
    for row, field in zip(rows, fields):
        default = json.dumps(field.default) if isinstance(field.default, str) else repr(field.default)
        assert row[1] == f"`{default}`", (field.name, row[1])
        assert len(row[2]) > 20, (field.name, row[2])


def test_options_table_reads_the_docstrings(tmp_path):
    """The generator takes the string literal after each field, as Markdown; a field without one is refused."""
    import pytest

    from benchmarks.options_table import config_options, options_table

    src = tmp_path / "config.py"
    src.write_text('class RoutingConfig:\n    """The class."""\n\n    mode: str = "mask"\n    """``"mask"``: one\n'
                   '    of :func:`~cggr.attach`\'s modes | or not."""\n\n    k: int = 4\n    """K."""\n')
    assert [o.name for o in config_options(str(src))] == ["mode", "k"]
    assert options_table(str(src)).splitlines()[2:] == [
        '| `mode` | `"mask"` | `"mask"`: one of `cggr.attach`\'s modes \\| or not. |', "| `k` | `4` | K. |"]
    src.write_text('class RoutingConfig:\n    mode: str = "mask"\n    k: int = 4\n    """K."""\n')
    with pytest.raises(ValueError, match="RoutingConfig.mode has no docstring"):
        config_options(str(src))
