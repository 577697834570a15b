"""cggr_lab.provenance: the record every results file carries, and its precedence for the revision."""

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
import torch

from cggr_lab import provenance as prov

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"git_rev", "git_dirty", "device", "torch", "transformers", "triton", "python", "command", "timestamp"}


def _git(*args, cwd=ROOT):
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_keys_versions_command_and_time():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    p = prov.provenance("cggr demo --steps 5", device="cpu")
    assert set(p) == KEYS
    assert p["command"] == "cggr demo --steps 5"
    assert p["torch"] == torch.__version__ and p["python"] == ".".join(map(str, sys.version_info[:3]))
    import transformers

    assert p["transformers"] == transformers.__version__
    stamp = datetime.fromisoformat(p["timestamp"])
    assert stamp.utcoffset() == timedelta(0) and before <= stamp <= datetime.now(timezone.utc)
    assert p["device"].startswith("cpu (") and f"{torch.get_num_threads()} threads)" in p["device"]


def test_default_command_is_this_process_as_it_was_typed(tmp_path):
    """A script run by path is recorded with its path; a module run (``python -m benchmarks.speed``) with ``-m``
    and the module's name, as it is run again, not with the file path Python puts into ``sys.argv[0]``."""
    (tmp_path / "pkg_x").mkdir()
    (tmp_path / "pkg_x" / "__init__.py").write_text("")
    (tmp_path / "pkg_x" / "run.py").write_text("from cggr_lab import provenance\nprint(provenance.provenance()['command'])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    exe = os.path.basename(sys.executable)
    as_module = subprocess.run([sys.executable, "-m", "pkg_x.run", "a b", "--c"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, check=True)
    assert shlex.split(as_module.stdout.strip()) == [exe, "-m", "pkg_x.run", "a b", "--c"]
    script = str(tmp_path / "pkg_x" / "run.py")
    by_path = subprocess.run([sys.executable, script, "x"], env=env, capture_output=True, text=True, check=True)
    assert shlex.split(by_path.stdout.strip()) == [exe, script, "x"]
    assert prov.package_version("surely-not-an-installed-distribution") is None


def test_revision_of_this_checkout():
    p = prov.provenance()
    head = _git("rev-parse", "HEAD")
    if head is None or _git("rev-parse", "--show-toplevel") is None:
        pytest.skip("the tests run from a tree without git metadata")
    assert p["git_rev"] == head
    assert p["git_dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))


def test_override_wins_over_the_checkout(monkeypatch):
    monkeypatch.setenv("CGGR_GIT_REV", "0123456789abcdef")
    p = prov.provenance()
    assert p["git_rev"] == "0123456789abcdef" and p["git_dirty"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_an_installed_copy_inside_another_repository_records_no_revision(tmp_path, monkeypatch):
    """A virtual environment in some project's folder is not cggr's checkout: its revision is not cggr's."""
    monkeypatch.delenv("CGGR_GIT_REV", raising=False)
    repo = tmp_path / "project"
    site = repo / "venv" / "site-packages" / "cggr_lab"
    site.mkdir(parents=True)
    shutil.copy(prov.__file__, site / "provenance.py")
    assert _git("init", "-q", cwd=repo) is not None
    (repo / "f.txt").write_text("x")
    _git("add", "f.txt", cwd=repo)
    assert _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x", cwd=repo) is not None
    spec = importlib.util.spec_from_file_location("installed_provenance", site / "provenance.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.CHECKOUT == (site.parent).resolve()
    assert copy.git_revision() == (None, None)
    # The same file at the top of its own repository reports that repository's revision.
    top = tmp_path / "checkout"
    (top / "cggr_lab").mkdir(parents=True)
    shutil.copy(prov.__file__, top / "cggr_lab" / "provenance.py")
    _git("init", "-q", cwd=top)
    _git("add", "cggr_lab", cwd=top)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "x", cwd=top)
    spec = importlib.util.spec_from_file_location("checkout_provenance", top / "cggr_lab" / "provenance.py")
    mine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mine)
    assert mine.git_revision() == (_git("rev-parse", "HEAD", cwd=top), False)
    (top / "cggr_lab" / "provenance.py").write_text("# edited\n")
    assert mine.git_revision()[1] is True
