"""hydrabench: an evaluation and benchmark harness for parameter-efficient fine-tuning."""

__version__ = "0.1.0"
