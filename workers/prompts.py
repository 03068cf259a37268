"""The prompt text of a record: the reference's two templates, byte for byte, or a clean one.

The LLM-Adapters reference (AGI-Edgerunners/LLM-Adapters, every study command after its commit
b6f55cd of 2023-04-07) builds prompts in two places with two slightly different texts:

- training (`finetune.py`): the head ends "request. " (with an input) or "request.  " (without),
  and the blank lines between sections are 16 spaces, the f-string's indentation;
- evaluation (`evaluate.py`, `commonsense_evaluate.py`, identical): the head ends "request." (with an
  input) or "request. " (without), and the blank lines are empty.

Both indent every section line by 16 spaces, and both end where the response starts. `paper` uses
each where the reference does: `training_prompt` for fine-tuning, `evaluation_prompt` for the test
sets. `alpaca` is the clean Alpaca text (no indentation, no trailing spaces), one text for both.
"""

from __future__ import annotations

from typing import Literal

Template = Literal["paper", "alpaca"]
TEMPLATES: tuple[str, ...] = ("paper", "alpaca")

_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_I = " " * 16


def training_prompt(instruction: str, input: str | None, output: str | None, template: Template = "paper") -> str:
    """The fine-tuning text of a record (`finetune.py`); with `output` None or empty, its prompt part."""
    output = output or ""
    if template == "alpaca":
        return _alpaca(instruction, input) + output
    if input:
        return (f"{_HEAD_INPUT} \n\n{_I}### Instruction:\n{_I}{instruction}\n{_I}\n"
                f"{_I}### Input:\n{_I}{input}\n{_I}\n{_I}### Response:\n{_I}{output}")
    return f"{_HEAD}  \n\n{_I}### Instruction:\n{_I}{instruction}\n{_I}\n{_I}### Response:\n{_I}{output}"


def evaluation_prompt(instruction: str, input: str | None = None, template: Template = "paper") -> str:
    """The prompt a test question is asked with (`evaluate.py`, `commonsense_evaluate.py`)."""
    if template == "alpaca":
        return _alpaca(instruction, input)
    if input:
        return (f"{_HEAD_INPUT}\n\n{_I}### Instruction:\n{_I}{instruction}\n\n"
                f"{_I}### Input:\n{_I}{input}\n\n{_I}### Response:\n{_I}")
    return f"{_HEAD} \n\n{_I}### Instruction:\n{_I}{instruction}\n\n{_I}### Response:\n{_I}"


def _alpaca(instruction: str, input: str | None) -> str:
    if input:
        return f"{_HEAD_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"{_HEAD}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
