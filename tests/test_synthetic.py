"""The embedded suite and tiny base model are identical on every machine and in every process."""

import json
import re
import subprocess
import sys

from hydrabench.data import synthetic


def in_fresh_process(code: str, hash_seed: str) -> str:
    env = {"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True, timeout=300).stdout


def test_suite_is_independent_of_the_hash_seed() -> None:
    code = ("from hydrabench.data.synthetic import evaluation_fingerprint, training_fingerprint; "
            "print(training_fingerprint(), evaluation_fingerprint())")
    assert in_fresh_process(code, "1") == in_fresh_process(code, "2")


def test_tokenizer_is_independent_of_the_hash_seed() -> None:
    code = ("import json; from hydrabench.models.tiny import TinyModelRecipe, _train_tokenizer; "
            "print(json.dumps(_train_tokenizer(TinyModelRecipe()).get_vocab(), sort_keys=True))")
    first = json.loads(in_fresh_process(code, "1"))
    assert len(first) == recipe_vocab_size()
    assert first == json.loads(in_fresh_process(code, "2"))


def recipe_vocab_size() -> int:
    from hydrabench.models.tiny import TinyModelRecipe

    return TinyModelRecipe().vocab_size


def test_components_sizes_and_answers() -> None:
    suite = synthetic.build_suite()
    assert list(suite) == list(synthetic.COMPONENTS)
    for name, component in suite.items():
        assert len(component.train) == 300
        assert len(component.eval_docs) == synthetic.EVAL_ITEMS[name]
    # Every held-out item of facts asks a different question about a country of training.
    facts = [d["question"] for d in suite["facts"].eval_docs]
    assert len(facts) == len(set(facts)) == 3 * synthetic.FACT_COUNTRIES
    for doc in suite["arithmetic"].eval_docs:  # the stated sum/difference is the #### answer
        a, op, b, result = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", doc["answer"]).groups()
        assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert doc["answer"].endswith(f"#### {result}")
    for doc in suite["medical"].eval_docs + suite["legal"].eval_docs:
        assert 0 <= doc["answer"] < len(doc["choices"])
    eval_questions = {d["question"] for d in suite["facts"].eval_docs}
    assert not eval_questions & {r.instruction for r in suite["facts"].train}  # held out


def test_more_evaluation_items_leave_training_and_the_first_items_as_they_are(
        monkeypatch) -> None:
    """Each component draws its training records first: growing its held-out split appends
    items and never shifts what runs train on (nor the base model's corpus)."""
    full = synthetic.build_suite()
    monkeypatch.setattr(synthetic, "EVAL_ITEMS", dict.fromkeys(synthetic.COMPONENTS, 60))
    synthetic.build_suite.cache_clear()
    try:
        small = synthetic.build_suite()
    finally:
        synthetic.build_suite.cache_clear()
    for name in synthetic.COMPONENTS:
        assert small[name].train == full[name].train, name
        assert small[name].knowledge == full[name].knowledge, name
        assert full[name].eval_docs[:60] == small[name].eval_docs, name
