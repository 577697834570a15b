import os

import pytest

# Kernels are tested on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """The versions this run tests (CI installs the newest releases within the declared ranges)."""
    from cggr.env_report import env_report

    return "versions: " + ", ".join(f"{name} {version}" for name, version in env_report().items()
                                    if name not in ("platform", "gpus"))


def pytest_collection_modifyitems(session, config, items):
    """A test argument that names neither a fixture nor a parameter fails only at setup, which a skip mark never
    reaches (test_cuda.py on a machine without a GPU): fail the collection instead, everywhere. (A helper put
    between a ``parametrize`` decorator and its test once turned every case of a GPU test into such an error.)"""
    unresolved = []
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:  # not a Python test function
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        missing = [n for n in info.argnames if n not in info.name2fixturedefs and n not in params]
        if missing:
            unresolved.append(f"{item.nodeid}: {', '.join(missing)}")
    if unresolved:
        raise pytest.UsageError("test arguments that name no fixture and no parameter:\n  " + "\n  ".join(unresolved))
