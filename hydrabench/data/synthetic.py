"""The embedded synthetic suite: a heterogeneous instruction mixture standing in for the paper.

Each component has its own format, mimicking one benchmark family, and a held-out evaluation split
that lm-eval scores through the YAML tasks in `tasks/tiny/`:

| component  | mimics              | lm-eval scoring                         |
|------------|---------------------|-----------------------------------------|
| facts      | MMLU (knowledge)    | multiple choice, acc by loglikelihood   |
| medical    | medical MMLU        | multiple choice (department of a case)  |
| legal      | law MMLU            | multiple choice (area of law of a text) |
| arithmetic | GSM8K               | generation, `#### N`, exact match       |
| bbh        | BBH algorithmic     | generation, exact match                 |
| code       | HumanEval           | generation, unit tests (opt-in)         |

Everything is generated from fixed seeds, so the suite is identical on every machine; the
training records use exactly the evaluation prompt format, so a tiny model can learn it.
Evaluation facts are the training facts asked another way: knowledge must transfer from the
statements seen in training to the questions asked at evaluation.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from hydrabench.data.records import InstructionRecord

SUITE_SEED = 1234
COMPONENTS = ("facts", "medical", "legal", "arithmetic", "bbh", "code")
FACT_COUNTRIES = 60
# Held-out items per component: enough that three seeds detect a difference of a few points on
# `general` (docs/results/claims-tiny.md); facts asks each country's three facts once. Code keeps
# 60: its problems are 24 distinct functions, and each sample runs in the sandbox.
EVAL_ITEMS = {"facts": 3 * FACT_COUNTRIES, "medical": 300, "legal": 300, "arithmetic": 300,
              "bbh": 300, "code": 60}

_SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vor", "zel", "pru", "dan", "fi", "gol", "hu", "sar"]
_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
_ANIMALS = ["owl", "wolf", "bear", "fox", "eagle", "horse", "lion", "otter"]
_FRUITS = ["apples", "pears", "plums", "lemons", "figs", "cherries"]
_PEOPLE = ["Mia", "Tom", "Ana", "Leo", "Zoe", "Sam", "Ivy", "Max"]

# A department is decided by the symptoms; a few symptoms are shared to make the task non-trivial.
_DEPARTMENTS = {
    "cardiology": ["chest pain", "palpitations", "shortness of breath", "swollen ankles"],
    "neurology": ["headache", "numbness", "dizziness", "blurred vision"],
    "dermatology": ["rash", "itching", "dry skin", "blisters"],
    "gastroenterology": ["stomach pain", "nausea", "heartburn", "bloating"],
}
_LAW_AREAS = {
    "contract": ["the seller shall deliver", "payment is due", "the agreement terminates",
                 "the parties agree"],
    "criminal": ["the defendant stole", "the accused assaulted", "the police arrested",
                 "the jury convicted"],
    "property": ["the tenant shall pay rent", "the land boundary", "the landlord may enter",
                 "the deed transfers"],
    "family": ["custody of the child", "the divorce decree", "spousal support",
               "the adoption order"],
}
_WORDS = ["apple", "river", "stone", "cloud", "tiger", "music", "glass", "paper", "flame",
          "honey", "ocean", "maple", "zebra", "quilt", "lemon", "north"]


@dataclass(frozen=True)
class Component:
    """One intrinsic sub-task: training records plus a held-out evaluation split (lm-eval docs)."""

    name: str
    train: tuple[InstructionRecord, ...]
    eval_docs: tuple[dict, ...]
    # What a pre-trained model would know of the domain, in prose unlike the task's format: the
    # tiny base model reads it in pre-training, so fine-tuning teaches the task, as with an LLM.
    knowledge: tuple[str, ...] = ()


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _mc_doc(question: str, answer: str, options: list[str], rng: random.Random) -> dict:
    distractors = rng.sample([o for o in options if o != answer], 3)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def _facts(rng: random.Random, n_train: int, n_eval: int) -> Component:
    countries: dict[str, dict[str, str]] = {}
    while len(countries) < FACT_COUNTRIES:
        countries[_name(rng)] = {}
    # dict.fromkeys dedupes in a fixed order; a set's order would change with PYTHONHASHSEED.
    cities = list(dict.fromkeys(_name(rng) for _ in range(4 * FACT_COUNTRIES)))
    for attrs in countries.values():
        attrs.update(capital=rng.choice(cities), colour=rng.choice(_COLOURS),
                     animal=rng.choice(_ANIMALS))
    names = list(countries)
    train = []
    for i in range(n_train):
        country = names[i % len(names)]
        a = countries[country]
        train.append(InstructionRecord(
            instruction=f"Tell me about {country}.\n",
            output=f"The capital of {country} is {a['capital']}, its flag is {a['colour']} "
                   f"and its animal is the {a['animal']}.",
            component="facts"))
    pools = {"capital": cities, "colour": _COLOURS, "animal": _ANIMALS}
    questions = {"capital": "What is the capital of {}?",
                 "colour": "What colour is the flag of {}?",
                 "animal": "Which animal is the symbol of {}?"}

    def ask(country: str, attr: str) -> dict:
        return _mc_doc(questions[attr].format(country), countries[country][attr], pools[attr], rng)

    # One attribute of each country first (the suite's first 60 items, as before), then the
    # others: every fact of training asked once, up to n_eval.
    first = {}
    eval_docs = []
    for country in names:
        first[country] = rng.choice(list(pools))
        eval_docs.append(ask(country, first[country]))
    eval_docs += [ask(country, attr) for country in names for attr in pools
                  if attr != first[country]]
    knowledge = [f"{country} has {a['capital']} as its capital, a {a['colour']} flag and the "
                 f"{a['animal']} as its emblem." for country, a in countries.items()]
    return Component("facts", tuple(train), tuple(eval_docs[:n_eval]), tuple(knowledge))


def _classification(name: str, classes: dict[str, list[str]], stem: str, ask: str,
                    teach: str, rng: random.Random, n_train: int, n_eval: int) -> Component:
    def case() -> tuple[str, str]:
        label = rng.choice(list(classes))
        cues = rng.sample(classes[label], 2)
        other = rng.choice([c for c in classes if c != label])
        cues.append(rng.choice(classes[other]))  # one misleading cue: the majority decides
        rng.shuffle(cues)
        return f"{stem}: {', '.join(cues)}. {ask}", label

    train = [InstructionRecord(instruction=f"Question: {q}\nAnswer:", output=f" {label}",
                               component=name)
             for q, label in (case() for _ in range(n_train))]
    eval_docs = []
    for _ in range(n_eval):
        q, label = case()
        eval_docs.append({"question": q, "choices": list(classes),
                          "answer": list(classes).index(label)})
    knowledge = [teach.format(label=label, cue=cue) for label, cues in classes.items()
                 for cue in cues]
    return Component(name, tuple(train), tuple(eval_docs), tuple(knowledge))


def _word_problem(rng: random.Random) -> tuple[str, str]:
    person, fruit = rng.choice(_PEOPLE), rng.choice(_FRUITS)
    a, b = rng.randint(2, 30), rng.randint(1, 20)
    if rng.random() < 0.5:
        q = f"{person} has {a} {fruit}. {person} buys {b} more. How many {fruit} now?"
        return q, f"{person} has {a} + {b} = {a + b} {fruit}.\n#### {a + b}"
    a = a + b
    q = f"{person} has {a} {fruit}. {person} gives away {b}. How many {fruit} are left?"
    return q, f"{person} has {a} - {b} = {a - b} {fruit}.\n#### {a - b}"


def _arithmetic(rng: random.Random, n_train: int, n_eval: int) -> Component:
    train = [InstructionRecord(instruction=f"Question: {q}\nAnswer:", output=f" {a}",
                               component="arithmetic")
             for q, a in (_word_problem(rng) for _ in range(n_train))]
    eval_docs = [{"question": q, "answer": a}
                 for q, a in (_word_problem(rng) for _ in range(n_eval))]
    # Every sum and difference the word problems need, as bare equations.
    knowledge = [f"{a} {op} {b} = {a + b if op == '+' else a - b}."
                 for a in range(1, 51) for b in range(1, 21) for op in "+-" if a - b >= 0]
    return Component("arithmetic", tuple(train), tuple(eval_docs), tuple(knowledge))


def _boolean_expression(rng: random.Random) -> tuple[str, str]:
    terms = [rng.choice(["True", "False"]) for _ in range(3)]
    ops = [rng.choice(["and", "or"]) for _ in range(2)]
    expr = f"{terms[0]} {ops[0]} {terms[1]} {ops[1]} {terms[2]}"
    if rng.random() < 0.5:
        expr = "not " + expr
    return f"Evaluate: {expr} is", str(eval(expr))


def _dyck(rng: random.Random) -> tuple[str, str]:
    pairs = {"(": ")", "[": "]", "{": "}"}
    opened = [rng.choice(list(pairs)) for _ in range(rng.randint(2, 4))]
    closing = " ".join(pairs[o] for o in reversed(opened))
    return f"Close the brackets: {' '.join(opened)}", closing


def _word_sorting(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 3)
    return f"Sort alphabetically: {' '.join(words)}", " ".join(sorted(words))


def _bbh(rng: random.Random, n_train: int, n_eval: int) -> Component:
    makers: list[Callable[[random.Random], tuple[str, str]]] = [
        _boolean_expression, _dyck, _word_sorting]

    def example(i: int) -> tuple[str, str]:
        return makers[i % len(makers)](rng)

    train = [InstructionRecord(instruction=f"Q: {q}\nA:", output=f" {a}", component="bbh")
             for q, a in (example(i) for i in range(n_train))]
    eval_docs = [{"input": q, "target": a} for q, a in (example(i) for i in range(n_eval))]
    truth = ["True", "False"]
    knowledge = [f"{x} {op} {y} gives {eval(f'{x} {op} {y}')}." for x in truth for y in truth
                 for op in ("and", "or")]
    knowledge += [f"not {x} gives {not eval(x)}." for x in truth]
    knowledge += [f"The bracket {o} is closed by {c}." for o, c in (("(", ")"), ("[", "]"),
                                                                     ("{", "}"))]
    knowledge += [f"In alphabetical order {w} comes before {v}." for w in _WORDS for v in _WORDS
                  if w < v]
    return Component("bbh", tuple(train), tuple(eval_docs), tuple(knowledge))


_CODE_OPS = [("plus", "+"), ("minus", "-"), ("times", "*")]


def _function_problem(rng: random.Random, index: int) -> dict:
    word, op = rng.choice(_CODE_OPS)
    k = rng.randint(2, 9)
    name = f"{word}_{k}"
    prompt = f'def {name}(x):\n    """Return x {word} {k}."""\n'
    test = (f"def check(candidate):\n    assert candidate(3) == 3 {op} {k}\n"
            f"    assert candidate(-2) == -2 {op} {k}\n")
    return {"task_id": f"Synthetic/{index}", "prompt": prompt, "entry_point": name,
            "canonical_solution": f"    return x {op} {k}\n", "test": test}


def _code(rng: random.Random, n_train: int, n_eval: int) -> Component:
    problems = [_function_problem(rng, i) for i in range(n_train + n_eval)]
    train = [InstructionRecord(instruction=p["prompt"], output=p["canonical_solution"],
                               component="code") for p in problems[:n_train]]
    return Component("code", tuple(train), tuple(problems[n_train:]))


@cache
def build_suite(n_train: int = 300) -> dict[str, Component]:
    """The whole suite, keyed by component name; identical for identical arguments."""
    builders = {
        "facts": _facts,
        "medical": lambda rng, nt, ne: _classification(
            "medical", _DEPARTMENTS, "Symptoms", "Which department should see the patient?",
            "Doctors in {label} treat {cue}.", rng, nt, ne),
        "legal": lambda rng, nt, ne: _classification(
            "legal", _LAW_AREAS, "Clause", "Which area of law is this?",
            "Lawyers file \"{cue}\" under {label} law.", rng, nt, ne),
        "arithmetic": _arithmetic,
        "bbh": _bbh,
        "code": _code,
    }
    # One generator per component, seeded by name, so changing one never shifts the others; each
    # draws its training records before its evaluation items, so more items leave training as is.
    return {name: builder(random.Random(f"{SUITE_SEED}:{name}"), n_train, EVAL_ITEMS[name])
            for name, builder in builders.items()}


def training_records(components: tuple[str, ...] = COMPONENTS) -> list[InstructionRecord]:
    """The training mixture, interleaved so every batch sees several components."""
    suite = build_suite()
    streams = [suite[c].train for c in components]
    return [rec for group in zip(*streams, strict=True) for rec in group]


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def training_fingerprint() -> str:
    """sha256 of every component's training records: what a run trains on and the tiny base
    model is built from (its evaluation items are not: more items never retrain anything)."""
    return _digest({name: [r.to_dict() for r in c.train] for name, c in build_suite().items()})


def evaluation_fingerprint() -> str:
    """sha256 of every component's evaluation items: what the tiny tasks score."""
    return _digest({name: list(c.eval_docs) for name, c in build_suite().items()})


def pretraining_text(n_docs: int = 6000, seed: int = 7) -> list[str]:
    """Generated English, numbers and Python, plus the suite's domain knowledge, for pre-training
    the tiny base model.

    Like an LLM's pre-training corpus, it holds what the tasks ask about (each component's
    `knowledge`) but never in the tasks' question-and-answer formats, and no evaluation item:
    fine-tuning teaches the tasks, and how well a method does that is what the tables compare.
    """
    rng = random.Random(seed)
    domains = [c.knowledge for c in build_suite().values() if c.knowledge]
    templates: list[Callable[[], str]] = [
        lambda: f"{rng.choice(_PEOPLE)} saw a {rng.choice(_COLOURS)} {rng.choice(_ANIMALS)} "
                f"near the {rng.choice(_WORDS)}. It was {rng.choice(['happy', 'tired', 'fast'])}.",
        lambda: f"There are {rng.randint(1, 40)} {rng.choice(_FRUITS)} in the basket and "
                f"{rng.randint(1, 40)} on the table.",
        lambda: f"The city of {_name(rng)} lies by a {rng.choice(['river', 'lake', 'hill'])}.",
        lambda: f"def {rng.choice(_WORDS)}(x):\n    return x {rng.choice('+-*')} "
                f"{rng.randint(1, 9)}\n",
        lambda: f"{rng.choice(['True', 'False'])} {rng.choice(['and', 'or'])} "
                f"{rng.choice(['True', 'False'])}; words: {' '.join(rng.sample(_WORDS, 4))}.",
        lambda: f"Question: what is {rng.randint(1, 30)} and {rng.randint(1, 30)}? "
                f"Answer: a number.",
    ]
    # Half generic text, half knowledge, the domains equally often whatever their sizes.
    return [" ".join([rng.choice(templates)(), rng.choice(rng.choice(domains)),
                      rng.choice(templates)(), rng.choice(rng.choice(domains))])
            for _ in range(n_docs)]
