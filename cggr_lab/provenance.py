"""What every results file records about how it was made: one helper for every writer.

    from cggr_lab.provenance import provenance

    record = {**provenance(), "results": ...}

The demo, the quality benchmark, the scripts under ``benchmarks/`` and the
examples all call :func:`provenance`, so their files say the same things with
the same precedence:

* ``git_rev`` -- ``$CGGR_GIT_REV`` when set (a tree copied to another machine
  carries a stale ``.git`` or none), else ``git rev-parse HEAD`` of the
  checkout this package was imported from, else ``None`` (an installed copy is
  not a checkout: its revision is unknown, not that of a repository around it);
* ``git_dirty`` -- whether that checkout had uncommitted changes to tracked
  files (``None`` when the revision came from the variable or is unknown);
* ``device`` -- the GPU's name, or ``cpu (<processor>, <N> threads)``;
* ``torch``, ``transformers``, ``triton``, ``python`` -- versions (``None``
  for a package that is not installed);
* ``command`` -- the command line, as given or as this process was started;
* ``timestamp`` -- when the record was made, UTC, ISO 8601.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from cggr import env

CHECKOUT = Path(__file__).resolve().parent.parent
"""The folder holding this package: the repository root when it runs from a checkout."""


def provenance(command: str | None = None, *, device: torch.device | str | None = None) -> dict:
    """The provenance record (keys in the module docstring).

    ``command``: the command line to record (default: this process's, ``python script.py args``).
    ``device``: the device the run used (default: the current CUDA device if there is one, else the CPU).
    """
    rev, dirty = git_revision()
    return {
        "git_rev": rev,
        "git_dirty": dirty,
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "python": platform.python_version(),
        "command": command if command is not None else _command_line(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _command_line() -> str:
    """This process's command line as it was typed: ``python -m pkg.mod args`` for a module run (``sys.argv[0]``
    then holds the module's file path, which is not how it is run), else ``python script.py args``."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = main_spec.name.removesuffix(".__main__") if main_spec is not None else None  # -m pkg runs pkg.__main__
    head = ["-m", module] if module and module != "__main__" else sys.argv[:1]
    return shlex.join([Path(sys.executable).name, *head, *sys.argv[1:]])


def git_revision() -> tuple[str | None, bool | None]:
    """``(revision, dirty)``: ``$CGGR_GIT_REV`` first, then this package's checkout, else ``(None, None)``."""
    override = env.git_rev_override()
    if override:
        return override, None
    top = _git("rev-parse", "--show-toplevel")
    # Only the repository this package is the top of: an installed copy inside some other repository
    # (a virtual environment in a project folder) must not record that project's revision.
    if top is None or Path(top).resolve() != CHECKOUT:
        return None, None
    rev = _git("rev-parse", "--verify", "-q", "HEAD")
    if not rev:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return rev, (None if status is None else bool(status))


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device, else ``cpu (<processor>, <N> threads)``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def _git(*args: str) -> str | None:
    """Stdout of ``git ARGS`` in :data:`CHECKOUT` (stripped), or None when git fails or is absent."""
    try:
        done = subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (read from its metadata: nothing is imported)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def routing_record(router) -> dict:
    """The routing a routed arm ran, cggr's automatic choices resolved (``placement="auto"``, ``dense_ends=None``):
    an arm's options name only what it sets, so its record says what they resolved to."""
    import dataclasses

    from cggr.config import RoutingConfig

    c = router.config
    out = {k: getattr(c, k) for k in ("inactive", "placement", "dense_ends")}
    # The sampling options, where the arm set them (records of the default routing stay as they were).
    defaults = {f.name: f.default for f in dataclasses.fields(RoutingConfig)}
    out.update({k: getattr(c, k) for k in ("estimator", "importance", "sampler", "importance_mix", "variance_budget",
                                           "variance_every") if getattr(c, k) != defaults[k]})
    return out
