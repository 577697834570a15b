"""cggr.cli: the harness commands run through a lazy import of cggr_lab, and a missing package of the
``demo`` extra reads as the install command that brings it."""

import sys

import pytest

import cggr_lab
from cggr.cli import main


@pytest.mark.parametrize("argv", [["demo", "--steps", "1"], ["bench", "quality", "--steps", "1"]],
                         ids=["demo", "bench-quality"])
@pytest.mark.parametrize("module", cggr_lab.REQUIREMENTS)
def test_missing_extra_names_the_install_command(argv, module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    assert main(argv + ["--out", "/nonexistent/never-written"]) == 1
    err = capsys.readouterr().err
    command = " ".join(argv[:-2])
    assert err.startswith(f"cggr {command}: error: this command needs {module}: ")
    assert 'pip install ".[demo]"' in err and "Traceback" not in err


def test_a_module_missing_mid_run_is_named_too(monkeypatch, capsys):
    import cggr_lab.demo

    def run_demo(args):
        import surely_not_an_installed_module  # noqa: F401

    monkeypatch.setattr(cggr_lab.demo, "run_demo", run_demo)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "'surely_not_an_installed_module', which is not installed" in err and 'pip install ".[demo]"' in err


def test_a_broken_import_inside_cggr_is_not_called_a_missing_package(monkeypatch):
    import cggr_lab.demo

    def run_demo(args):
        import cggr_lab.no_such_module  # noqa: F401

    monkeypatch.setattr(cggr_lab.demo, "run_demo", run_demo)
    with pytest.raises(ModuleNotFoundError, match="cggr_lab.no_such_module"):
        main(["demo"])


def test_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
