"""The examples run (tiny sizes, CPU)."""

import importlib.util
import json
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_example(tmp_path, monkeypatch):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"==> doc{i} <==\n" + "the cat sat on the mat and looked around. " * 60
                                for i in range(8)))
    results = _load("hf_trainer").main(["--tiny", "--steps", "3", "--batch-size", "2", "--data", str(corpus),
                                        "--out", str(tmp_path / "out")])
    plain, routed = results
    assert plain["arm"] == "plain" and routed["arm"] == "cggr"
    # The callback's metrics reach the Trainer's log history; the plain run has none.
    assert any("cggr/mean_depth_fraction" in e for e in routed["log_history"])
    assert not any(k.startswith("cggr/") for e in plain["log_history"] for k in e)
    saved = json.loads((tmp_path / "out" / "hf-trainer.json").read_text())
    assert [r["arm"] for r in saved["results"]] == ["plain", "cggr"]
    from cggr_lab.provenance import provenance

    expected = provenance()
    assert set(expected) <= set(saved) and saved["git_rev"] == expected["git_rev"]
