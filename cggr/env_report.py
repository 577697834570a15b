"""Versions to paste into a bug report: ``python -m cggr.env_report``.

Packages are looked up by their installed metadata, so a broken or missing
optional package (Triton, transformers, ...) shows as such instead of
failing the report.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

_PACKAGES = ("torch", "triton", "transformers", "tokenizers", "accelerate", "peft", "lightning", "trl", "liger-kernel")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> dict[str, str]:
    """Python, platform, package versions, CUDA and GPU names, as strings."""
    from . import __version__

    report = {"cggr": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    report.update({name: _version(name) for name in _PACKAGES})
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the report must print whatever is broken
        report["cuda"] = report["gpus"] = f"unavailable (torch: {type(e).__name__}: {e})"
        return report
    report["cuda"] = torch.version.cuda or "none"
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        report["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(n)) or "none"
    except Exception as e:  # noqa: BLE001
        report["gpus"] = f"unavailable ({type(e).__name__}: {e})"
    return report


def main() -> int:
    report = env_report()
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
