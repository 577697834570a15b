"""TRL's ``SFTTrainer`` with ``CGGRCallback``: a prompt-completion dataset with ``completion_only_loss`` gives the
prompt tokens labels -100, and the router gives those positions (whose next label is -100) depth 0.

TRL >= 1.x computes the SFT loss through a fused LM head (``trl.trainer.utils.add_fused_lm_head``): the model is
called with ``fused_lm_head=True`` and returns per-token log-probabilities, never the logits. The default random
policy needs none: the plain ``SFTTrainer`` routes (the valid tokens come from the labels it passes). A policy
that scores tokens fails with an error that says what to use instead; routing by the plain loss path
(``transformers.Trainer.compute_loss``, ``_LogitsSFTTrainer``) routes alike."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tests.tiny import hf_model  # noqa: E402

PROMPTS = ["the cat sat on", "a dog ran to", "the bird flew over", "my fish swam in", "the cow ate some",
           "a fox hid under", "the owl looked at", "an ant walked past"]
COMPLETIONS = [" the mat", " the park quickly", " the tall green tree", " a bowl", " fresh grass today",
               " the old log", " the moon", " a big red rock"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in PROMPTS + COMPLETIONS for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>")


def _sft_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class _LogitsSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss comes from the model's own forward (with logits), as in ``transformers.Trainer``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return _LogitsSFTTrainer


def _make_trainer(tmp_path, trainer_class, max_steps, **options):
    from trl import SFTConfig

    from cggr.integrations import CGGRCallback

    tokenizer = _tokenizer()
    model = hf_model("llama", vocab=len(tokenizer), seed=1)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    callback = CGGRCallback(**dict(num_buckets=2, warmup_steps=0), **options)  # target depths at once
    args = SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                     gradient_accumulation_steps=1, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                     completion_only_loss=True, max_length=32, packing=False)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[callback])
    return trainer, model, callback


@pytest.mark.parametrize("plain", [True, False], ids=["SFTTrainer", "SFTTrainer-with-Trainer-loss"])
def test_sft_trainer_completion_only_loss_routes_prompt_tokens_at_depth_zero(tmp_path, plain):
    from trl import SFTTrainer

    trainer, model, callback = _make_trainer(tmp_path, SFTTrainer if plain else _sft_trainer_class(), max_steps=2)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append({k: kw.get(k) for k in ("labels",
                                                                                           "attention_mask")}),
                                    with_kwargs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    router = callback.router
    assert router is not None and router.model is model and router.metrics()["step"] == 2 == trainer.state.global_step
    labels = seen[-1]["labels"]
    assert labels is not None, "SFTTrainer did not pass labels to the model: the router cannot see the prompt mask"
    depth = router.routing.depth
    assert depth.shape == labels.shape
    next_label = torch.full_like(labels, -100)
    next_label[:, :-1] = labels[:, 1:]
    prompt_like = next_label == -100  # prompt tokens (and padding, and each row's last token)
    assert prompt_like.any() and (~prompt_like).any()
    assert (depth[prompt_like] == 0).all()
    assert (depth[~prompt_like] > 0).all()  # every completion token keeps some depth (K=2: L/2 or L)
    # the prompt mask really comes from completion_only_loss: a row's first completion token has a label
    am = seen[-1]["attention_mask"]
    for row in range(labels.shape[0]):
        n_prompt = int((labels[row] == -100)[am[row].bool()].sum())
        assert n_prompt >= 3  # the prompt's words (at least three per prompt)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and "cggr/mean_depth_fraction" in logs[-1]


def test_plain_sft_trainer_with_a_difficulty_policy_says_how_to_get_scores(tmp_path):
    """TRL's fused LM head returns per-token log-probabilities, no logits: a policy that scores tokens has
    nothing to read, and the error says what to do instead."""
    from trl import SFTTrainer

    if not hasattr(trl.trainer.utils, "add_fused_lm_head"):
        pytest.skip("this TRL computes the SFT loss from the logits")
    trainer, _, _ = _make_trainer(tmp_path, SFTTrainer, max_steps=1, policy="difficulty")
    with warnings.catch_warnings(), pytest.raises(TypeError, match="policy='difficulty' scores tokens from the "
                                                                    "model's logits.*fused_loss=True"):
        warnings.simplefilter("ignore")
        trainer.train()
