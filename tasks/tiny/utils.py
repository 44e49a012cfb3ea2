"""Dataset loader for the synthetic suite's evaluation splits (lm-eval `custom_dataset`)."""

from datasets import Dataset, DatasetDict

from hydrabench.data.synthetic import build_suite


def load_component(component: str, **metadata) -> DatasetDict:
    """The held-out split of one suite component, generated deterministically (no files needed)."""
    return DatasetDict({"test": Dataset.from_list(list(build_suite()[component].eval_docs))})
