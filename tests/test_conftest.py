"""The suite's own guard (tests/conftest.py): a test argument that names no fixture and no parameter fails the
collection, even where a skip mark would hide the setup error."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOST_PARAMETERS = '''
import pytest

@pytest.mark.parametrize("mode", [1, 2])
def _helper(mode):  # the decorator meant for the test below
    return mode

@pytest.mark.skipif(True, reason="as a GPU test is on a CPU")
def test_lost(mode, tmp_path):
    assert mode

@pytest.mark.parametrize("mode", [1, 2])
def test_kept(mode, tmp_path):
    assert mode
'''


def _collect(tmp_path, source):
    path = tmp_path / "test_guarded.py"
    path.write_text(source)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "-p", "tests.conftest", str(path)], cwd=ROOT, capture_output=True, text=True)


def test_an_argument_without_fixture_or_parameter_fails_the_collection(tmp_path):
    out = _collect(tmp_path, LOST_PARAMETERS)
    assert out.returncode != 0
    error = (out.stdout + out.stderr).split("name no fixture and no parameter:")[1]
    assert "test_guarded.py::test_lost: mode" in error
    assert "test_kept" not in error  # its parameter and fixture resolve


def test_resolved_arguments_collect(tmp_path):
    out = _collect(tmp_path, LOST_PARAMETERS.replace("def test_lost(mode, tmp_path)", "def test_lost(tmp_path)"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 tests collected" in out.stdout
