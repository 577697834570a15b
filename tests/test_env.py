"""cggr.env: every environment variable cggr reads, read at call time."""

from pathlib import Path

from cggr import env


def test_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("CGGR_DISABLE_TRITON", "1")
    monkeypatch.setenv("CGGR_COMPILE", "0")
    monkeypatch.setenv("CGGR_CACHE", str(tmp_path))
    monkeypatch.setenv("CGGR_GIT_REV", "abc123")
    assert env.triton_disabled() and not env.compile_enabled()
    assert env.cache_dir() == tmp_path and env.git_rev_override() == "abc123"
    for name in ("CGGR_DISABLE_TRITON", "CGGR_COMPILE", "CGGR_CACHE", "CGGR_GIT_REV"):
        monkeypatch.delenv(name)
    assert not env.triton_disabled() and env.compile_enabled() and env.git_rev_override() is None
    assert env.cache_dir() == Path.home() / ".cache" / "cggr"


def test_no_other_module_reads_the_environment():
    import re

    root = Path(env.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "env.py" and re.search(r"os\.environ|os\.getenv", p.read_text())]
    assert offenders == []
