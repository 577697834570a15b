"""cggr_lab.demo (``cggr demo``): smoke runs on CPU with a tiny model."""

import json

import pytest

from cggr_lab.provenance import provenance
from tests.textdata import _corpus_folder


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CGGR_CACHE", str(tmp_path / "cache"))


def _demo_argv(tmp_path, arms):
    corpus = _corpus_folder(tmp_path / "corpus", n_docs=40)
    return ["demo", "--arms", arms, "--steps", "3", "--d-model", "32", "--layers", "2", "--heads", "2",
            "--seq-len", "16", "--batch-size", "2", "--vocab-size", "300", "--eval-every", "2",
            "--eval-batches", "2", "--warmup-steps", "1", "--data", str(corpus), "--out", str(tmp_path / "out"),
            "--device", "cpu"]


def test_demo_smoke_dense(tmp_path, capsys):
    from cggr.cli import main

    assert main(_demo_argv(tmp_path, "dense")) == 0
    printed = capsys.readouterr().out
    png, js = tmp_path / "out" / "demo.png", tmp_path / "out" / "demo.json"
    assert png.stat().st_size > 0 and js.exists()
    assert "median step ms" in printed and "\ndense " in printed
    assert str(png) in printed and str(js) in printed
    record = json.loads(js.read_text())
    assert [a["arm"] for a in record["arms"]] == ["dense"]
    assert record["command"].startswith("cggr demo --arms dense") and record["device"].startswith("cpu")
    # The provenance of cggr_lab.provenance, for the device the demo ran on.
    expected = provenance(device="cpu")
    assert set(expected) <= set(record) and record["device"] == expected["device"]
    assert record["git_rev"] == expected["git_rev"] and record["torch"] == expected["torch"]
    arm = record["arms"][0]
    assert arm["step"] == [0, 2, 3] and len(arm["val_loss"]) == 3 and len(arm["step_ms"]) == 3
    assert arm["speedup_vs_dense"] == 1.0 and arm["mean_depth_fraction"] == 1.0
    assert record["config"]["d_model"] == 32 and record["data"]["val_documents"] == 2


def test_demo_rejects_unknown_arm(tmp_path, capsys):
    from cggr.cli import main

    assert main(_demo_argv(tmp_path, "dense,bogus")) == 1
    assert "--arms" in capsys.readouterr().err


def test_demo_smoke_routed_arms(tmp_path, capsys):
    import cggr

    if not hasattr(cggr, "attach"):
        pytest.skip("cggr.attach is not available yet")
    from cggr.cli import main

    assert main(_demo_argv(tmp_path, "dense,random,difficulty")) == 0
    record = json.loads((tmp_path / "out" / "demo.json").read_text())
    arms = {a["arm"]: a for a in record["arms"]}
    assert list(arms) == ["dense", "random", "difficulty"]
    # Identical initial weights: the step-0 validation loss is the same in every arm.
    assert arms["dense"]["val_loss"][0] == arms["difficulty"]["val_loss"][0] == arms["random"]["val_loss"][0]
    for name in ("difficulty", "random"):
        assert arms[name]["policy"] == name
        assert len(arms[name]["router_metrics"]) == 3
        assert 0.0 < arms[name]["mean_depth_fraction"] < 1.0
    printed = capsys.readouterr().out
    assert "\ndifficulty " in printed and "\nrandom " in printed
