"""The README's result tables are regenerated from the committed JSON, and CI runs the README's test command."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_tables_match_committed_results():
    r = subprocess.run([sys.executable, "-m", "benchmarks.report", "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


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


def test_every_file_the_readme_links_is_committed():
    """Plots and results the README links to exist in the checkout and are not ignored by git (a link to
    a PNG that .gitignore keeps out of the repository works here and is dead on a fresh clone)."""
    import re

    readme = open(os.path.join(ROOT, "README.md")).read()
    links = sorted(set(re.findall(r"\]\(((?:benchmarks|examples|tests|cggr|cggr_lab)/[^)#\s]+)\)", readme)))
    assert links, "the README links no repository files"
    missing = [p for p in links if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, missing
    ignored = subprocess.run(["git", "check-ignore", *links], cwd=ROOT, capture_output=True, text=True).stdout
    assert not ignored.strip(), ignored
