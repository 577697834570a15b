"""A Llama trained with the Hugging Face Trainer, with and without cggr's callback.

    python examples/hf_trainer.py                  # CUDA: a ~110M Llama in bf16, 300 steps per arm
    python examples/hf_trainer.py --tiny --steps 6 # CPU smoke run

Both arms start from the same weights and see the same batches; the only
difference is ``callbacks=[CGGRCallback(...)]``. Prints the callback's
``cggr/`` metrics as the Trainer logs them, then the median step time of each
arm (steps after the first 20, timed between the Trainer's step events with a
device synchronisation) and the final training loss. ``--out`` gets a JSON.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from cggr.integrations import CGGRCallback
from cggr_lab import data
from cggr_lab.provenance import provenance
from cggr_lab.training import build_llama


class Windows(Dataset):
    """Non-overlapping ``seq_len`` windows of a token stream as causal-LM examples."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        n = stream.numel() // seq_len
        self.windows = stream[: n * seq_len].view(n, seq_len)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids.clone()}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def train(arm: str, args, init_state, model_config, dataset) -> dict:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(model_config)
    model.load_state_dict(init_state)
    if torch.cuda.is_available():
        model.to("cuda", dtype=torch.bfloat16)  # bf16 weights: cggr's compacted backward applies
    timer = StepTimer()
    callbacks = [timer]
    if arm == "cggr":
        callbacks.append(CGGRCallback(num_buckets=4, warmup_steps=max(1, args.steps // 5), policy=args.policy))
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / arm), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
        weight_decay=0.1, adam_beta2=0.95, logging_steps=max(1, args.steps // 6), save_strategy="no",
        report_to=[], seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    gaps = [1e3 * (b - a) for a, b in zip(timer.times, timer.times[1:])]
    logs = [e for e in trainer.state.log_history if "loss" in e]
    for e in logs:
        print(f"  [{arm}] " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in e.items()))
    return {"arm": arm, "step_ms_median": statistics.median(gaps[20:] or gaps), "final_train_loss": logs[-1]["loss"],
            "log_history": trainer.state.log_history}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="corpus (file, folder or .xz); default the Python standard library")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--policy", default="random", help="routing policy of the cggr arm (default: the library default)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d64 model and 64-token sequences (CPU smoke)")
    p.add_argument("--out", default="cggr-out/hf-trainer")
    args = p.parse_args(argv)
    d, layers, heads, seq, vocab = (64, 2, 2, 64, 512) if args.tiny else (768, 12, 12, 1024, 16384)
    train_docs, _ = data.split_documents(data.load_documents(args.data), val_fraction=0.05, seed=0)
    tok = data.train_tokenizer(train_docs, vocab)
    dataset = Windows(data.encode_documents(tok, train_docs), seq)
    torch.manual_seed(0)
    model_config, model = build_llama(d, layers, heads, tok.get_vocab_size(), seq, data.eot_id(tok))
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"Llama d{d} L{layers}: {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M parameters, "
          f"{args.steps} steps of {args.batch_size}x{seq} tokens", flush=True)
    del model
    results = [train(arm, args, init_state, model_config, dataset) for arm in ("plain", "cggr")]
    plain, routed = results
    print(f"\nplain Trainer: {plain['step_ms_median']:.1f} ms/step, final loss {plain['final_train_loss']:.4f}")
    print(f"with CGGRCallback: {routed['step_ms_median']:.1f} ms/step, final loss {routed['final_train_loss']:.4f}, "
          f"speedup {plain['step_ms_median'] / routed['step_ms_median']:.3f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf-trainer.json").write_text(json.dumps({
        **provenance(shlex.join(sys.argv)), "args": vars(args), "results": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
