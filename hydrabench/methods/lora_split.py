"""LoRA-Split (the paper's Table 1): n LoRAs of rank r in place of one LoRA of rank n·r.

The paper does not say how the n LoRAs are trained or combined. Three readings:

`lora-split` (the default): n LoRA experts of rank r, each with its own A_i and B_i, mixed per
token by a dense softmax router (float32) and trained jointly on the whole corpus,
``y = W x + (alpha / r) sum_i g_i(x) B_i A_i x`` — HydraLoRA's layer with one A per head,
N = n, rank r. Two facts make this the reading: the authors describe LoRA-Split as "multiple
smaller LoRAs (nAnB) with the same total number of parameters ... used for fine-tuning each task"
(Clin0212/HydraLoRA issue #14, answer A2), and the paper's Fig. 6 reports HydraLoRA "without
shared A" — router-mixed heads, each with its own A — with exactly the LoRA-Split 4×8 numbers of
Table 2 (46.94 / 45.28 / 41.35): the paper treats the two as one model. %Param counts the experts
(n·r·(in + out) per layer, LoRA r = n·r's count); the router is reported apart. The gate depends
on every token, so no merge into W is exact.

`lora-split-sum`: adapter k (a peft LoRA) trained alone on component k of the corpus, the n
adapters summed with weight 1 by peft's `cat` merge into one rank n·r LoRA (mergeable). Nothing in
the paper or its code sums them: every input then receives n-1 updates never trained on it.

`lora-split-routed`: the same per-component training; at inference each sequence goes to the
adapter of its nearest component centroid in TF-IDF space (hard routing per example, the literal
reading of "one LoRA for each task"), via peft's mixed-batch `adapter_names`. The centroids and the
TF-IDF vocabulary are saved with the artifact. The routed text is the sequence the model is given:
the prompt when generating, the prompt plus a candidate answer when lm-eval scores choices (it does
not pass them apart). Not mergeable.

Components are the corpus's task labels when there are exactly n of them, else n TF-IDF k-means
clusters (the paper's way of finding intrinsic components).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import pairwise_distances_argmin

from hydrabench.config.spec import RunSpec
from hydrabench.data.clustering import cluster_labels
from hydrabench.data.records import InstructionRecord
from hydrabench.errors import SpecError
from hydrabench.methods.api import Method, TrainFn
from hydrabench.methods.hydralora import HeadedAdapter, balanced_loss, make_method
from hydrabench.methods.lora import lora_config, merge_peft, on_own_base

COMBINED = "combined"
ROUTER_CONFIG = "prompt_router.json"
ROUTER_WEIGHTS = "prompt_router.safetensors"


def split_name(k: int) -> str:
    return f"split_{k}"


def split_text(record: InstructionRecord) -> str:
    """The text a record is clustered (and routed) by."""
    return record.instruction + " " + record.input


def split_components(records: Sequence[InstructionRecord], n: int, seed: int) -> list[int]:
    """Component index of every record: task labels if the corpus has exactly n, else k-means."""
    labels = sorted({r.component for r in records if r.component})
    if len(labels) == n and all(r.component for r in records):
        return [labels.index(r.component) for r in records]
    return cluster_labels([split_text(r) for r in records], n, seed)


def check_splits(spec: RunSpec, records: Sequence[InstructionRecord]) -> None:
    """One adapter per component needs at least one training record per component."""
    n = spec.adapter.num_splits
    if n > len(records):
        raise SpecError(f"{spec.method} trains one adapter per component: {n} splits need at "
                        f"least {n} training records, the corpus {spec.corpus} has {len(records)}")


# -- lora-split: n router-mixed experts ---------------------------------------------------------


def spec_num_splits(spec: RunSpec) -> int:
    return spec.adapter.num_splits


# n experts of rank r, each its own A_i and B_i, one router: HydraLoRA's layer without the shared
# A, with N = num_splits.
EXPERTS = HeadedAdapter(heads=spec_num_splits, shared_a=False)

METHOD = make_method(
    "lora-split", "LoRA-Split n×r, the default reading (the paper states none; the authors' "
    "'nAnB' in HydraLoRA issue #14, and Fig. 6 gives HydraLoRA without shared A its numbers): "
    "n experts of rank r, own A and B, per-token softmax router, trained jointly",
    EXPERTS, loss_fn=balanced_loss)


# -- per-component training, shared by lora-split-sum, lora-split-routed and lorahub ------------


def adapt_splits(model: torch.nn.Module, spec: RunSpec,
                 records: Sequence[InstructionRecord]) -> torch.nn.Module:
    """n peft LoRA adapters split_0 .. split_{n-1}, untrained."""
    config = lora_config(spec.adapter)
    peft_model = get_peft_model(model, config, adapter_name=split_name(0))
    for k in range(1, spec.adapter.num_splits):
        peft_model.add_adapter(split_name(k), config)
    return peft_model


def train_splits(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
                 train_fn: TrainFn, component: Sequence[int] | None = None
                 ) -> tuple[list[str], dict]:
    """Train adapter split_k on component k alone: (adapter names, training summary)."""
    n = spec.adapter.num_splits
    if component is None:
        component = split_components(records, n, spec.seed)
    total_steps = spec.train.max_steps
    summaries = {}
    for k in range(n):
        subset = [r for r, c in zip(records, component, strict=True) if c == k]
        # With a step budget, each adapter gets its share of it, proportional to its data.
        steps = max(1, math.ceil(total_steps * len(subset) / len(records))) if total_steps else None
        model.set_adapter(split_name(k))
        summaries[split_name(k)] = {"records": len(subset),
                                    **train_fn(model, subset, tag=split_name(k), max_steps=steps)}
    return list(summaries), {
        "splits": summaries, "steps": sum(s["steps"] for s in summaries.values()),
        "trained_tokens": sum(s["trained_tokens"] for s in summaries.values())}


# -- lora-split-sum: the n adapters summed by peft's cat merge ----------------------------------


def combine_splits(model: PeftModel, names: Sequence[str]) -> None:
    """Replace the adapters by their sum (weight 1 each): peft's `cat` merge, one rank n·r LoRA."""
    model.add_weighted_adapter(list(names), [1.0] * len(names), adapter_name=COMBINED,
                               combination_type="cat")
    model.set_adapter(COMBINED)
    for name in names:
        model.delete_adapter(name)


def _fit_sum(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
             train_fn: TrainFn) -> dict:
    names, summary = train_splits(model, spec, records, train_fn)
    combine_splits(model, names)
    return summary


def save_combined(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)  # peft writes a non-default adapter to directory/<name>


def load_combined(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    return on_own_base(PeftModel.from_pretrained(base, directory / COMBINED,
                                                 adapter_name=COMBINED), base)


SUM_METHOD = Method(
    name="lora-split-sum",
    description="LoRA-Split n×r, summed reading (not the default): n LoRAs of rank r, each "
                "trained on one data component, summed by peft's cat merge",
    adapt=adapt_splits, save=save_combined, load=load_combined, merge=merge_peft, fit=_fit_sum,
    check=check_splits)


# -- lora-split-routed: each prompt to its component's adapter ----------------------------------


@dataclass
class PromptRouter:
    """Nearest-centroid routing in the TF-IDF space the components were found in."""

    vocabulary: dict[str, int]
    idf: np.ndarray  # [vocab]
    centroids: np.ndarray  # [n, vocab]: the mean TF-IDF vector of each component's records

    @classmethod
    def fit(cls, texts: Sequence[str], component: Sequence[int], n: int) -> PromptRouter:
        vectorizer = TfidfVectorizer()  # the features cluster_labels clusters
        features = vectorizer.fit_transform(texts)
        labels = np.asarray(component)
        centroids = np.stack([np.asarray(features[labels == k].mean(axis=0)).ravel()
                              for k in range(n)])
        vocabulary = {word: int(i) for word, i in vectorizer.vocabulary_.items()}
        return cls(vocabulary, vectorizer.idf_.astype(np.float64), centroids)

    def route(self, texts: Sequence[str]) -> list[int]:
        """Index of the nearest centroid (Euclidean, k-means' assignment rule) of every text."""
        vectorizer = TfidfVectorizer(vocabulary=self.vocabulary)
        vectorizer.idf_ = self.idf
        return [int(k) for k in
                pairwise_distances_argmin(vectorizer.transform(texts), self.centroids)]

    def save(self, directory: Path) -> None:
        (directory / ROUTER_CONFIG).write_text(json.dumps(
            {"num_splits": len(self.centroids), "vocabulary": self.vocabulary}))
        save_file({"idf": self.idf, "centroids": self.centroids}, str(directory / ROUTER_WEIGHTS))

    @classmethod
    def load(cls, directory: Path) -> PromptRouter:
        arrays = load_file(str(directory / ROUTER_WEIGHTS))
        vocabulary = json.loads((directory / ROUTER_CONFIG).read_text())["vocabulary"]
        return cls(vocabulary, arrays["idf"], arrays["centroids"])


def route_by_prompt(model: PeftModel, router: PromptRouter, tokenizer) -> PeftModel:
    """Make `model` (a PeftModel holding split_0 .. split_{n-1}) run every sequence of a batch
    through the adapter its text routes to: forward and generate get peft's `adapter_names`."""

    def add_adapter_names(args: tuple, kwargs: dict) -> dict:
        if "adapter_names" not in kwargs:
            input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            kwargs["adapter_names"] = [split_name(k) for k in router.route(texts)]
        return kwargs

    model.register_forward_pre_hook(
        lambda module, args, kwargs: (args, add_adapter_names(args, kwargs)), with_kwargs=True)
    generate = model.generate

    def routed_generate(*args, **kwargs):
        return generate(*args, **add_adapter_names(args, kwargs))

    # generate calls the wrapped transformers model directly, past the forward pre-hook.
    model.generate = routed_generate
    return model


def _fit_routed(model: torch.nn.Module, spec: RunSpec, records: Sequence[InstructionRecord],
                train_fn: TrainFn) -> dict:
    component = split_components(records, spec.adapter.num_splits, spec.seed)
    _, summary = train_splits(model, spec, records, train_fn, component)
    model.prompt_router = PromptRouter.fit([split_text(r) for r in records], component,
                                           spec.adapter.num_splits)
    return summary


def save_routed(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(directory)  # directory/split_k for every adapter
    model.prompt_router.save(directory)


def load_routed(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    from transformers import AutoTokenizer

    router = PromptRouter.load(directory)
    model = PeftModel.from_pretrained(base, directory / split_name(0),
                                      adapter_name=split_name(0))
    for k in range(1, len(router.centroids)):
        model.load_adapter(directory / split_name(k), adapter_name=split_name(k))
    on_own_base(model, base).eval()
    # Routing reads the text: the tokenizer of the base model the adapters were loaded onto.
    tokenizer = AutoTokenizer.from_pretrained(base.config._name_or_path)
    return route_by_prompt(model, router, tokenizer)


ROUTED_METHOD = Method(
    name="lora-split-routed",
    description="LoRA-Split n×r, routed reading (not the default): n LoRAs of rank r, each "
                "trained on one data component; each prompt to its nearest TF-IDF centroid's LoRA",
    adapt=adapt_splits, save=save_routed, load=load_routed, fit=_fit_routed, check=check_splits)
