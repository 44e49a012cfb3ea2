"""The embedded default base model: a tiny Llama with its own tokenizer, built and cached locally.

No hub is reachable, so hydrabench builds the default itself, deterministically: a byte-level BPE
tokenizer trained on generated text, and a `LlamaForCausalLM` pre-trained briefly on that text so
that fine-tuning adapts a model that already models language. Head size 32 keeps it servable by
vLLM's CPU attention (which rejects head size 8 or 16).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

from hydrabench.data import synthetic
from hydrabench.paths import cache_root
from hydrabench.progress import log, report_progress


@dataclass(frozen=True)
class TinyModelRecipe:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 512
    pretrain_steps: int = 1200
    pretrain_batch: int = 16
    pretrain_seq: int = 128
    pretrain_lr: float = 3e-3
    seed: int = 0
    recipe_version: int = 3

    def fingerprint(self) -> str:
        """Recipe and the text the model is built from: a change to either builds a new one."""
        blob = json.dumps(asdict(self), sort_keys=True) + _corpus_digest()
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@cache
def _corpus_digest() -> str:
    text = json.dumps([synthetic.pretraining_text(), synthetic.training_fingerprint()])
    return hashlib.sha256(text.encode()).hexdigest()


def _train_tokenizer(recipe: TinyModelRecipe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    suite = synthetic.build_suite()
    corpus = synthetic.pretraining_text() + [
        r.instruction + r.output for c in suite.values() for r in c.train]
    tok.train_from_iterator(corpus, trainer=trainer)
    # Like Llama: BOS is prepended by the tokenizer, so lm-eval's add_bos_token works as usual.
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=recipe.max_positions)


def _pretrain(model, tokenizer, recipe: TinyModelRecipe) -> list[float]:
    """Next-token pre-training on packed generated text: plain loop, cosine decay."""
    docs = tokenizer(synthetic.pretraining_text(), add_special_tokens=False)["input_ids"]
    data = torch.tensor([tok for doc in docs for tok in [*doc, tokenizer.eos_token_id]])
    seq, batch = recipe.pretrain_seq, recipe.pretrain_batch
    n_windows = (len(data) - 1) // seq
    windows = data[: n_windows * seq].view(n_windows, seq)
    gen = torch.Generator().manual_seed(recipe.seed)
    optim = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / recipe.pretrain_steps)))
    losses = []
    model.train()
    for _ in report_progress(range(recipe.pretrain_steps), "pre-training the tiny base model",
                             total=recipe.pretrain_steps):
        rows = torch.randint(0, n_windows, (batch,), generator=gen)
        input_ids = torch.cat(
            [torch.full((batch, 1), tokenizer.bos_token_id), windows[rows]], dim=1)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_model(recipe: TinyModelRecipe = TinyModelRecipe(), root: Path | None = None) -> Path:
    """Return the directory of the cached tiny base model, building it on first use."""
    models = (root or cache_root()) / "models"
    target = models / f"tiny-llama-{recipe.fingerprint()}"
    if (target / "hydrabench_tiny.json").exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    # One build at a time: processes that start together wait for the first build and reuse it.
    with (models / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "hydrabench_tiny.json").exists():
            for stale in models.glob(".building-*"):  # left by a killed build (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            log(f"building the tiny base model once: {recipe.pretrain_steps} pre-training steps "
                f"(a few minutes on 2 cores), cached in {target}")
            _build(recipe, target)
    return target


def _build(recipe: TinyModelRecipe, target: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    tokenizer = _train_tokenizer(recipe)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, recipe)
    # Build in a temp dir beside the target and rename, so a killed build leaves no half model.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        meta = {"recipe": asdict(recipe), "fingerprint": recipe.fingerprint(),
                "pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1]}
        (staging / "hydrabench_tiny.json").write_text(json.dumps(meta, indent=2))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
