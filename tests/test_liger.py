"""Liger-Kernel first, then cggr, for every family of the registry that Liger-Kernel patches (issue 26).

Each case runs tests/liger_compose.py in a process of its own (Liger's patches replace functions and classes of
transformers' modules, and of torch with its cross-entropy, for the whole process; that module's docstring says
what it shims to run Liger's kernels under Triton's interpreter): the tiny model of the family, Liger's patch on
the instance, ``cggr.attach(model, warmup_steps=0)``, one routed backward, and the reference routing of a
deepcopy of the same patched model. The cases run side by side, one process per core.

The models are CPU ones, so Liger's Triton kernels run only under ``TRITON_INTERPRET=1`` (tests/conftest.py
sets it by default); on a GPU, tests/test_cuda.py checks Liger-patched Llama.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cggr.families import FAMILIES

if importlib.util.find_spec("liger_kernel") is None:
    pytest.skip("liger-kernel is not installed (pip install liger-kernel)", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU models: Liger-Kernel's Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 "
                "(tests/test_cuda.py runs Liger on the GPU)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

# What attach decides for each family Liger-Kernel 0.8.5 patches (its MODEL_TYPE_TO_APPLY_LIGER_FN), and why:
# the compacted backward of the family's record on every block where the attach-time check admits the patched
# block (Liger's RMSNorm by its casting mode and offset, its SwiGLU/GEGLU MLP by the family's activation, its RoPE
# through the spec variant that reads the first half of cos/sin), else the generic routed backward with the
# router's reason for it.
_VARIANT = "its rotary reading the first half of cos/sin (as Liger-Kernel's RoPE does)"
EXPECTED = {
    # Llama's layer; Mistral's (no sliding window in the tiny config) and Qwen 2's (q/k/v biases) are the same.
    "llama": ("llama", _VARIANT), "mistral": ("llama", _VARIANT), "qwen2": ("llama", _VARIANT),
    # Liger patches the q/k norms on the instance too: every norm of the block is Liger's, "llama" casting.
    "qwen3": ("qwen3", _VARIANT),
    # Liger's Gemma norms: offset 1, "gemma" casting (the weight in fp32), as the Gemma layouts read them;
    # its GEGLU MLP: tanh-approximated GELU, the family's activation.
    "gemma": ("gemma", _VARIANT), "gemma3_text": ("gemma3", _VARIANT),
    "phi3": ("phi3", _VARIANT),
    # Liger's instance patch replaces OLMo 2's two post-norms (casting "llama": the product rounds in the input
    # dtype) but leaves the q/k norms HF's (the product in fp32): the spec reads the q/k norms' kind apart.
    "olmo2": ("olmo2", _VARIANT),
    # Families whose record has no compacted backward: the generic one, patched or not.
    "gemma2": (None, "model_type 'gemma2' has no compacted backward"),
    "granite": (None, "model_type 'granite' has no compacted backward"),
    "smollm3": (None, "model_type 'smollm3' has no compacted backward"),
    "mixtral": (None, "model_type 'mixtral' has no compacted backward"),
    "qwen3_moe": (None, "model_type 'qwen3_moe' has no compacted backward"),
}
SEEDS = [3]  # the tiny model's weights and the batch


def _run(cases: list[tuple[str, int]]) -> dict:
    """The helper's outcomes of ``cases`` (run one after another), by case; a failed helper as each one's error."""
    done = subprocess.run([sys.executable, "-m", "tests.liger_compose", *(f"{k}:{s}" for k, s in cases)], cwd=ROOT,
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900)
    found = {(o["kind"], o["seed"]): o for o in (json.loads(line) for line in done.stdout.splitlines()
                                                 if line.startswith("{"))}
    return {case: found.get(case, dict(error=f"no outcome (exit status {done.returncode}): {done.stderr[-4000:]}"))
            for case in cases}


@pytest.fixture(scope="module")
def outcomes(request):
    """The cases this session selected, shared out among one helper per core; a test waits for its own."""
    wanted = list(dict.fromkeys(
        tuple(item.callspec.params[k] for k in ("kind", "seed")) for item in request.session.items
        if item.module is request.module and "kind" in getattr(getattr(item, "callspec", None), "params", {})))
    workers = max(1, min(len(wanted), os.cpu_count() or 1))
    shares = [wanted[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run, share) for share in shares]
        yield {case: future for share, future in zip(shares, futures) for case in share}


def test_every_registry_family_liger_patches_has_a_stated_outcome():
    """A family added to the registry (or to Liger's patches) that Liger patches needs its line in EXPECTED."""
    code = ("import json; from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as M; "
            "print(json.dumps({k: f.__name__ for k, f in M.items()}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    patched = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(set(patched) & set(FAMILIES)) == sorted(EXPECTED)
    assert all(patched[k] == f"apply_liger_kernel_to_{k}" for k in EXPECTED)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_liger_patched_family_takes_its_stated_backward_and_routed_gradients_equal_reference(outcomes, kind, seed):
    out = outcomes[kind, seed].result()[kind, seed]
    assert "error" not in out, out.get("error")
    # Liger's patch took effect on the instance: its RMSNorms, its MLPs, its loss (the fused linear cross-entropy
    # returns no logits; Granite has none in Liger and keeps HF's head with Liger's cross-entropy).
    assert out["liger_norms"] > 0 and out["liger_mlps"] == out["num_blocks"], out
    assert out["fused_loss"] == (kind != "granite") and out["logits"] == (not out["fused_loss"]), out
    backward, reason = EXPECTED[kind]
    n = out["num_blocks"]
    report = "\n".join(out["messages"])
    assert out["compact_blocks"] == [backward] * n, report
    block_lines = [line for line in report.splitlines() if line.lstrip().startswith(f"model.layers.")]
    assert len(block_lines) == n and all(reason in line for line in block_lines), report
    # One routed step: some tokens inactive in some block; the compacted blocks (all or none) took their backward.
    assert out["min_depth"] < n
    assert out["routed_compact_blocks"] == (list(range(n)) if backward else []), out
    assert abs(out["loss"] - out["ref_loss"]) <= 1e-6 * abs(out["ref_loss"])
    # fp32, seed 3: measured at most 2.4e-6 (OLMo 2), 1.6e-6 (Gemma 3), under 1e-6 for the other families.
    bad = {name: err for name, err in out["errors"].items() if err is not None and not err < 1e-5}
    assert not bad, bad
    assert sum(err is not None for err in out["errors"].values()) > 0
