"""Scoring with lm-eval: the harness, the code sandbox, paired statistics."""
