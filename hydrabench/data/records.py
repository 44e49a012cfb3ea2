"""The one record every training corpus is turned into, and the prompt templates."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Stanford Alpaca's template (not the HydraLoRA reference code's: that is REFERENCE below).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# The HydraLoRA reference code's template (build_dataset.py: PROMPT_TEMPLATE = "{instruction}</s>",
# the input joined to the instruction by a newline when there is one). "</s>" is written as text,
# as there: a LLaMA tokenizer reads it as its end-of-sequence token.
REFERENCE = "{instruction}</s>"
TEMPLATES = ("plain", "alpaca", "reference")


@dataclass(frozen=True)
class InstructionRecord:
    """instruction (+ optional input) → output; `component` is the intrinsic sub-task when known."""

    instruction: str
    output: str
    input: str = ""
    component: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def render_prompt(record: InstructionRecord, template: str) -> str:
    """The text the model sees before the response; the loss is on the response only.

    `plain` is the instruction, then the input on a line of its own when there is one (the
    synthetic suite's records carry the exact evaluation format in their instruction);
    `reference` is the HydraLoRA reference code's template over the same join (the response is
    followed by the end-of-sequence token, as training always does); `alpaca` is Stanford
    Alpaca's.
    """
    joined = "\n".join(part for part in (record.instruction, record.input) if part)
    if template == "plain":
        return joined
    if template == "reference":
        return REFERENCE.format(instruction=joined)
    if template == "alpaca":
        pattern = ALPACA_WITH_INPUT if record.input else ALPACA_NO_INPUT
        return pattern.format(instruction=record.instruction, input=record.input)
    raise ValueError(f"unknown prompt template {template!r} (valid: {', '.join(TEMPLATES)})")
