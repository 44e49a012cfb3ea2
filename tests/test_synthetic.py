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
    code = "from hydrabench.data.synthetic import suite_fingerprint; print(suite_fingerprint())"
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
    for component in suite.values():
        assert len(component.train) == 300 and len(component.eval_docs) == 60
    for doc in suite["arithmetic"].eval_docs:  # the stated sum/difference is the #### answer
        a, op, b, result = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", doc["answer"]).groups()
        assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert doc["answer"].endswith(f"#### {result}")
    for doc in suite["medical"].eval_docs + suite["legal"].eval_docs:
        assert 0 <= doc["answer"] < len(doc["choices"])
    eval_questions = {d["question"] for d in suite["facts"].eval_docs}
    assert not eval_questions & {r.instruction for r in suite["facts"].train}  # held out
