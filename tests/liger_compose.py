"""Each family's Liger-then-cggr check in a process of its own, for tests/test_liger.py:
``python -m tests.liger_compose <model_type>:<seed> ...`` prints one JSON line per case.

It builds the registry's tiny model of the family (fp32), applies Liger-Kernel's patch to the instance (the
options the benchmarks' liger arm takes, :data:`cggr_lab.liger.LIGER_OPTIONS`, save where a family's patch
refuses one: :func:`liger_options`), attaches cggr (``warmup_steps=0``), runs one routed backward, and runs the
same batch through a deepcopy of the patched model under :func:`cggr.reference_routing` with the router's
routing. It reports which blocks took the compacted backward, the router's reason for each block, and each
parameter's relative gradient error against the reference.

Why a process per case: Liger's patch functions replace module-level functions and classes of transformers'
modeling modules (and, with ``cross_entropy=True``, ``torch.nn.functional.cross_entropy``) for the whole
process, and the interpreter shims below replace parts of Triton's and Liger's modules; a process that ends
takes all of that with it, whatever a patch touched. The cases are forked from one process that has imported
torch, transformers, Liger and cggr and patched nothing (imports are most of a small case's time): each child
starts from that state and exits after its case.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``) three things keep Liger's kernels from running as they
run compiled, which :func:`interpreter_shims` provides with the compiled kernels' maths:

* a Python float argument reaches the kernel as a Python float (Triton's interpreter wraps ints and bools only),
  where compiled Triton passes it as an fp32 scalar (``mangle_type(float) == "fp32"``): Liger's RMSNorm kernel
  calls ``eps.to(tl.float32)``. The shim wraps it as that fp32 scalar.
* libdevice functions have no interpreter implementation (its ``extern_elementwise`` raises, the stubs return
  None): Liger's RMSNorm imports ``rsqrt``, its GEGLU and cross-entropy kernels ``tanh``. The shim evaluates them
  with numpy on the interpreter's arrays.
* Liger's fused MoE experts are ``triton.autotune``d, and autotuning benchmarks each config on a GPU driver:
  ``LIGER_FUSED_MOE_AUTOTUNE=0`` (Liger's own switch) pins each kernel to one config.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import traceback

os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")  # read when liger_kernel's fused MoE module is imported

import torch  # noqa: E402


def interpreter_shims() -> None:
    """Let Liger-Kernel's kernels run under Triton's interpreter (the module docstring says what and why)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):  # compiled Triton's type for a Python float argument: fp32
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    interpreter._implicit_cvt = implicit_cvt

    def elementwise(f):
        def apply(x):
            return tl.tensor(interpreter.TensorHandle(f(x.handle.data), x.handle.dtype.scalar), x.type)
        return apply

    from liger_kernel.ops import cross_entropy, geglu, rms_norm

    rms_norm.rsqrt = elementwise(lambda a: (1 / np.sqrt(a)).astype(a.dtype))
    geglu.tanh = cross_entropy.tanh = elementwise(np.tanh)


# Blocks of the tiny model: the registry's tests use 4; the MoE families 2, since Liger's fused experts sort each
# call's token-expert pairs under the interpreter in seconds (most of such a case's time).
LAYERS = {"mixtral": 2, "qwen3_moe": 2}


def liger_options(fn) -> dict:
    """The options ``fn`` (Liger's ``apply_liger_kernel_to_<family>``) is called with: the benchmarks' (RoPE,
    RMSNorm, SwiGLU or GEGLU, the fused linear cross-entropy), except that where Liger has no fused linear
    cross-entropy for the family (Granite: it raises NotImplementedError) its cross-entropy takes the loss."""
    from cggr_lab.liger import _options_of

    options = _options_of(fn)
    if fn.__name__ == "apply_liger_kernel_to_granite":
        options.update(fused_linear_cross_entropy=False, cross_entropy=True)
    return options


def rel_errors(model, ref) -> dict[str, float | None]:
    """Each parameter's relative gradient error against the reference's; None where both are exactly zero (a
    parameter no loss reaches), infinity where only the reference's is."""
    from tests.tiny import rel_err

    errors = {}
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        a = torch.zeros_like(p) if p.grad is None else p.grad
        b = torch.zeros_like(q) if q.grad is None else q.grad
        if b.norm() > 0:
            errors[name] = rel_err(a, b)
        else:
            errors[name] = None if a.norm() == 0 else float("inf")
    return errors


def run(kind: str, seed: int) -> dict:
    import transformers  # noqa: F401 (before Liger, as a user's script has it)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    import cggr
    from cggr.adapters import find_layer_stack
    from tests.tiny import hf_model, routed_as

    if os.environ.get("TRITON_INTERPRET") == "1":
        interpreter_shims()
    torch.set_num_threads(1)  # tiny tensors; the test runs families side by side
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cggr").addHandler(handler)
    logging.getLogger("cggr").setLevel(logging.INFO)

    start = time.perf_counter()
    model = hf_model(kind, layers=LAYERS.get(kind, 4), vocab=61, seed=seed)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[kind]
    options = liger_options(fn)
    fn(model=model, **options)
    fused_loss = "forward" in vars(model)  # Liger's fused linear cross-entropy: a forward bound to the instance
    ref = copy.deepcopy(model)
    router = cggr.attach(model, warmup_steps=0)
    ids = torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(seed))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    routing = router.routing
    with cggr.reference_routing(list(find_layer_stack(ref)[1]), **routed_as(router)):
        ref_out = ref(input_ids=ids, labels=ids)
        ref_out.loss.backward()
    return dict(
        kind=kind, seed=seed, liger_function=fn.__name__, options=options,
        fused_loss=fused_loss, logits=out.logits is not None,
        liger_norms=sum(hasattr(m, "casting_mode") for m in model.modules()),  # RMSNorms patched by Liger
        liger_mlps=sum(m._get_name().startswith("Liger") and not hasattr(m, "casting_mode")  # MLPs or experts
                       for m in model.modules()),
        compact_blocks=list(router.compact_blocks),
        routed_compact_blocks=sorted(routing.compact_blocks),
        min_depth=int(routing.depth.min()), num_blocks=len(find_layer_stack(model)[1]),
        loss=out.loss.item(), ref_loss=ref_out.loss.item(),
        errors=rel_errors(model, ref), messages=messages,
        seconds=round(time.perf_counter() - start, 2),
    )


def main(cases: list[str]) -> None:
    import transformers  # noqa: F401  (imported once, before any patch: the state each case forks from)
    import liger_kernel.transformers.monkey_patch  # noqa: F401
    import cggr  # noqa: F401
    import tests.tiny  # noqa: F401

    for case in cases:
        kind, seed = case.split(":")
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the case, in a process that ends with it
            os.close(read)
            try:
                out = run(kind, int(seed))
            except BaseException:
                out = dict(kind=kind, seed=int(seed), error=traceback.format_exc())
            with os.fdopen(write, "w") as pipe:
                pipe.write(json.dumps(out))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            text = json.dumps(dict(kind=kind, seed=int(seed), error=f"the case's process ended with status {status}"))
        print(text, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
