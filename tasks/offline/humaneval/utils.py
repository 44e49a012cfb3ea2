"""`!function` targets of the offline HumanEval tasks (lm-eval resolves them next to the YAML).

The functions live in hydrabench.code_eval, shared with tasks/tiny/tiny_code.yaml.
"""

from hydrabench.code_eval import build_predictions, build_predictions_instruct, pass_at_k

__all__ = ["build_predictions", "build_predictions_instruct", "pass_at_k"]
