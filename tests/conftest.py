import os

# Kernels are tested on the CPU through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """The versions this run tests (CI installs the newest releases within the declared ranges)."""
    from cggr.env_report import env_report

    return "versions: " + ", ".join(f"{name} {version}" for name, version in env_report().items()
                                    if name not in ("platform", "gpus"))
