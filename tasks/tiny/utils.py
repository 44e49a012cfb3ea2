"""Dataset loader for the synthetic suite's evaluation splits (lm-eval `custom_dataset`)."""

from datasets import Dataset, DatasetDict

# tiny_code's filter and metric, those of the offline humaneval task: lm-eval looks a `!function`
# up next to the YAML.
from hydrabench.code_eval import build_predictions, pass_at_k  # noqa: F401
from hydrabench.data.synthetic import build_suite


def load_component(component: str, **metadata) -> DatasetDict:
    """The held-out split of one suite component, generated deterministically (no files needed)."""
    return DatasetDict({"test": Dataset.from_list(list(build_suite()[component].eval_docs))})
