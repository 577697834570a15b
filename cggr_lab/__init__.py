"""cggr's benchmark and research harness, beside the library (``cggr/`` holds the library only).

* :mod:`cggr_lab.data` -- corpora, tokenizer and batches (docs/design.md §5);
* :mod:`cggr_lab.corpus` -- the large corpus built offline from Debian packages, its pack and memmap batches;
* :mod:`cggr_lab.training` -- the training loop of the demo and the quality benchmark;
* :mod:`cggr_lab.demo` -- ``cggr demo``;
* :mod:`cggr_lab.quality` -- ``cggr bench quality``;
* :mod:`cggr_lab.provenance` -- the revision and environment every results file records.

It ships in the ``cggr`` distribution. The library never imports it (the
``cggr`` command does, when one of these subcommands runs). Its third-party
packages are the ``demo`` extra, checked by :func:`missing_requirements`
before a command starts, so a missing one is named at once, not after minutes
of training.
"""

from __future__ import annotations

import importlib

EXTRA = "demo"
"""The extra of the ``cggr`` distribution that installs what the harness imports."""

REQUIREMENTS = ("transformers", "tokenizers", "matplotlib", "tqdm", "numpy")
"""The modules the demo and the quality benchmark import beyond torch: the ``demo`` extra's packages
(a test keeps the two lists equal)."""


def missing_requirements() -> list[str]:
    """The modules of :data:`REQUIREMENTS` that do not import here, each with the reason."""
    missing = []
    for name in REQUIREMENTS:
        try:
            importlib.import_module(name)
        except ImportError as e:
            # Not installed: its name; installed but broken: why it does not import.
            missing.append(name if getattr(e, "name", None) == name else f"{name} ({e})")
    return missing
