"""OpenCompass's PPL reading of MMLU (`mmlu_ppl_ac766d`) as lm-eval tasks.

Each of the four candidates is the whole prompt with that answer filled in; OpenCompass scores it
by its perplexity, the mean cross-entropy over the prompt's tokens, and the lowest wins. lm-eval
scores each candidate as a continuation of an empty context (so of the BOS token, as OpenCompass's
tokenizer call with add_special_tokens=True), which gives the summed log-likelihood;
`process_results` divides by the token count OpenCompass divides by and takes the lowest.

Sources (open-compass/opencompass @ a5acc4bb):
- opencompass/configs/datasets/mmlu/mmlu_ppl_ac766d.py: the hint (with its two spaces after
  "about"), `{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}`, "\nAnswer: {label}", the in-context
  template ending in "\n", FixKRetriever(fix_id_list=[0, 1, 2, 3, 4]) on the dev split.
- opencompass/openicl/icl_retriever/icl_base_retriever.py: generate_ice joins the examples with
  ice_separator "\n" and appends ice_eos_token "\n"; icl_zero_retriever.py: no examples and an
  empty ice_eos_token (the zero-shot reading, Clin0212/HydraLoRA#16).
- opencompass/openicl/icl_inferencer/icl_ppl_inferencer.py: one prompt per label, lowest PPL
  wins (`labels[ppl.index(min(ppl))]`: the first label on a tie).
- opencompass/models/huggingface_above_v4_33.py (HuggingFaceBaseModel.get_ppl): tokens with
  add_special_tokens=True, right-truncated at max_seq_len (the model's max_position_embeddings,
  `_get_possible_max_seq_len`); loss summed over the shifted labels and divided by the number
  of tokens (BOS included). `max_seq_len` in a model config would also make the inferencer drop
  in-context examples; the shipped hf_llama2_7b config sets none, so none are dropped here.

The loader needs the scoring model's tokenizer and context length: hydrabench passes them as
lm-eval task metadata (`tokenizer`, `max_length`), and lm-eval's --limit as `limit`, so that only
the documents lm-eval scores are tokenized (a five-shot prompt is thousands of tokens; tokenizing
every document of every subject took minutes and 8 GB). The data is the local copy
($HYDRABENCH_DATA_DIR) or, when a task's dataset_kwargs name a `hub` dataset (the
tasks/hub/mmlu_protocols groups), that dataset on the Hugging Face hub.
"""

import functools
import importlib.util
from pathlib import Path

import datasets

LABELS = "ABCD"


def _offline_data():
    # lm-eval imports this file by path, so the sibling loader module is imported the same way.
    path = Path(__file__).resolve().parents[1] / "hydrabench_offline_data.py"
    spec = importlib.util.spec_from_file_location("hydrabench_offline_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def question_text(doc: dict) -> str:
    """mmlu_ppl_ac766d's question_overall; its dataset keeps the CSV strings as they are."""
    a, b, c, d = doc["choices"]
    return f"{doc['question']}\nA. {a}\nB. {b}\nC. {c}\nD. {d}"


def prompts(doc: dict, subject: str, examples: list[dict]) -> list[str]:
    """The four whole prompts of a document, one per label."""
    hint = f"The following are multiple choice questions (with answers) about  {subject.replace('_', ' ')}.\n\n"  # noqa: E501
    ice = ("\n".join(f"{question_text(e)}\nAnswer: {LABELS[e['answer']]}\n" for e in examples)
           + "\n") if examples else ""
    return [f"{hint}{ice}{question_text(doc)}\nAnswer: {label}" for label in LABELS]


@functools.cache  # every subject's loader reads the same tokenizer
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def truncated(text: str, tokenizer, max_length: int) -> tuple[str, int]:
    """The text the model sees of a prompt and its token count (BOS included): the prompt
    right-truncated to max_length tokens, as a tokenizer call with truncation=True does."""
    encoded = tokenizer(text, truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
    count = len(encoded["input_ids"])
    # A prompt of max_length tokens or more ends where its last kept token ends.
    return (text if count < max_length else text[:encoded["offset_mapping"][-1][1]]), count


def _splits(subject: str, hub: str | None) -> datasets.DatasetDict:
    """The subject's test and dev splits in the cais/mmlu schema."""
    if hub is not None:
        return datasets.load_dataset(hub, subject)
    return _offline_data().load(benchmark="mmlu", subject=subject)


def _load(subject: str, shots: int, tokenizer: str, max_length: int, limit: int | None = None,
          hub: str | None = None, **metadata):
    tok = _tokenizer(tokenizer)
    splits = _splits(subject, hub)
    examples = list(splits["dev"])[:shots]
    test = splits["test"]
    rows = []
    for doc in test.select(range(min(len(test), int(limit)))) if limit else test:
        seen = [truncated(p, tok, int(max_length)) for p in prompts(doc, subject, examples)]
        rows.append({**doc, "ppl_prompts": [text for text, _ in seen],
                     "ppl_tokens": [count for _, count in seen]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_zero_shot(**kwargs):
    """ZeroRetriever: no in-context examples."""
    return _load(shots=0, **kwargs)


def load_five_shot(**kwargs):
    """FixKRetriever(fix_id_list=[0, 1, 2, 3, 4]): the subject's five dev items."""
    return _load(shots=5, **kwargs)


def process_results(doc: dict, results: list) -> dict:
    """acc of the lowest-perplexity label. Candidates that are the same text (a prompt the
    context cut before its answer) have the same perplexity, so the first of them wins."""
    first = {text: i for i, text in reversed(list(enumerate(doc["ppl_prompts"])))}
    perplexity = [-results[first[text]][0] / count
                  for text, count in zip(doc["ppl_prompts"], doc["ppl_tokens"], strict=True)]
    return {"acc": float(perplexity.index(min(perplexity)) == doc["answer"])}
