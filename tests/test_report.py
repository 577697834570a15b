"""The generated sections of README.md and docs/results.md match the committed JSON and RoutingConfig, CI runs
the README's test command, and every relative link of the documentation resolves."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.doclinks import ROOT, WRITTEN_ON_OTHER_BRANCHES, anchors, documents, relative_links


def test_generated_sections_match_committed_results_and_options():
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """benchmarks.report pointed at a copy of the documents (the committed results and config read in place)."""
    from benchmarks import report

    for rel in report.TARGETS:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        shutil.copy(os.path.join(ROOT, rel), tmp_path / rel)
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    return tmp_path, report


@pytest.mark.parametrize("stale", ["README.md", "docs/results.md"])
def test_check_fails_when_either_file_is_stale_and_a_run_fixes_it(checkout, stale, capsys):
    root, report = checkout
    marker = {"README.md": "<!-- generated:options -->\n", "docs/results.md": "<!-- results:speed -->\n"}[stale]
    text = (root / stale).read_text()
    assert marker in text
    (root / stale).write_text(text.replace(marker, marker + "| an edited row |\n", 1))
    assert report.main(["--check"]) == 1
    assert stale in capsys.readouterr().err
    assert report.main([]) == 0
    assert (root / stale).read_text() == text
    assert report.main(["--check"]) == 0


def test_a_missing_generated_section_is_an_error(checkout, capsys):
    root, report = checkout
    text = (root / "docs/results.md").read_text()
    start, end = text.index("<!-- results:kernels -->"), text.index("<!-- /results:kernels -->")
    (root / "docs/results.md").write_text(text[:start] + text[end + len("<!-- /results:kernels -->"):])
    assert report.main(["--check"]) == 1
    assert "results:kernels" in capsys.readouterr().err


def test_links_in_generated_text_are_rebased_to_their_file():
    from benchmarks.report import _rebase_links

    text = "[plot](benchmarks/results/a.png) [web](https://x.org/a) [here](#speed)"
    assert _rebase_links(text, "docs") == "[plot](../benchmarks/results/a.png) [web](https://x.org/a) [here](#speed)"
    assert _rebase_links(text, "") == text


def test_readme_supported_models_table_is_the_family_registrys():
    """The README's supported-models table is rendered from the registry (``python -m benchmarks.report``
    rewrites it): a family added to cggr.families is a row there."""
    from cggr.families import FAMILIES, supported_models_table

    readme = open(os.path.join(ROOT, "README.md")).read()
    start, end = "<!-- generated:supported-models -->\n", "\n<!-- /generated:supported-models -->"
    assert readme.count(start) == 1 and readme.count(end) == 1
    table = readme.split(start)[1].split(end)[0]
    assert table == supported_models_table()
    assert all(f"| `{kind}` |" in table for kind in FAMILIES)


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read().splitlines()
    i = readme.index("<!-- test-command -->")
    assert readme[i + 1] == "```bash" and "pytest" in readme[i + 2]
    out = subprocess.run(["sed", "-n", "/<!-- test-command -->/{n;n;p;}", os.path.join(ROOT, "README.md")],
                         capture_output=True, text=True).stdout.strip()
    assert out == readme[i + 2]


def test_every_relative_link_of_the_documentation_resolves():
    """Every relative link and image of README.md, CONTRIBUTING.md and docs/*.md points at a file or folder that
    exists and is not ignored by git (a link to a PNG that .gitignore keeps out of the repository works here and
    is dead on a fresh clone), and every #anchor at a heading of its document."""
    docs = documents()
    assert {"README.md", "CONTRIBUTING.md", "docs/design.md", "docs/results.md"} <= set(docs)
    links = {doc: relative_links(doc) for doc in docs}
    assert any(p.startswith("benchmarks/") for p, _ in links["README.md"] + links["docs/results.md"]), \
        "the documentation links no committed results"
    missing, bad_anchors = [], []
    for doc, found in links.items():
        for path, anchor in found:
            if not os.path.exists(os.path.join(ROOT, path)):
                if path not in WRITTEN_ON_OTHER_BRANCHES:
                    missing.append(f"{doc}: {path}")
            elif anchor and (not path.endswith(".md") or anchor not in anchors(path)):
                bad_anchors.append(f"{doc}: {path}#{anchor}")
    assert not missing, missing
    assert not bad_anchors, bad_anchors
    paths = sorted({p for found in links.values() for p, _ in found if os.path.exists(os.path.join(ROOT, p))})
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True).stdout
    assert not ignored.strip(), ignored
