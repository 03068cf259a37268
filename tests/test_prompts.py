"""The prompt templates, byte for byte against the reference's own text.

The reference strings below are test data: what the `generate_prompt` functions of
AGI-Edgerunners/LLM-Adapters return at commit 816657208af4db747803f87ba40a4c71383fed7a (HEAD;
finetune.py line 323, evaluate.py line 141, commonsense_evaluate.py line 121) for the record
instruction "What is 2 + 3?" / input "2 and 3" / output "The answer is 5.". `BEFORE_B6F55CD` is
finetune.py's text before commit b6f55cd (2023-04-07), which moved a linter comment out of the string.
"""

from __future__ import annotations

from workers.prompts import evaluation_prompt, training_prompt

# finetune.py (training): 16-space blank lines; "request. " with an input, "request.  " without.
FINETUNE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                What is 2 + 3?\n                \n"
    "                ### Input:\n                2 and 3\n                \n"
    "                ### Response:\n                The answer is 5."
)
FINETUNE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    "                ### Instruction:\n                What is 2 + 3?\n                \n"
    "                ### Response:\n                The answer is 5."
)
# evaluate.py and commonsense_evaluate.py (evaluation, the same text): empty blank lines;
# "request." with an input, "request. " without.
EVALUATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "                ### Instruction:\n                What is 2 + 3?\n\n"
    "                ### Input:\n                2 and 3\n\n"
    "                ### Response:\n                "
)
EVALUATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                What is 2 + 3?\n\n"
    "                ### Response:\n                "
)
BEFORE_B6F55CD = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.  # noqa: E501\n\n"
    "                ### Instruction:\n                What is 2 + 3?\n                \n"
    "                ### Response:\n                The answer is 5."
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is 2 + 3?\n\n### Input:\n2 and 3\n\n### Response:\n"
)
Q, INPUT, OUT = "What is 2 + 3?", "2 and 3", "The answer is 5."


def test_training_prompts_are_finetune_py_byte_for_byte() -> None:
    assert training_prompt(Q, INPUT, OUT) == FINETUNE_WITH_INPUT
    assert training_prompt(Q, "", OUT) == FINETUNE_NO_INPUT
    assert training_prompt(Q, None, OUT) == FINETUNE_NO_INPUT
    # The masked prompt part is the same template with an empty output, as finetune.py builds it.
    assert training_prompt(Q, None, None) == FINETUNE_NO_INPUT.removesuffix(OUT)
    assert training_prompt(Q, INPUT, "") == FINETUNE_WITH_INPUT.removesuffix(OUT)


def test_evaluation_prompts_are_the_evaluation_scripts_byte_for_byte() -> None:
    """Math (evaluate.py) and commonsense (commonsense_evaluate.py) sets: one text, both scripts'."""
    assert evaluation_prompt(Q, INPUT) == EVALUATE_WITH_INPUT
    assert evaluation_prompt(Q) == EVALUATE_NO_INPUT
    assert evaluation_prompt(Q, "") == EVALUATE_NO_INPUT


def test_the_two_paper_templates_differ_where_the_reference_differs() -> None:
    train, ask = training_prompt(Q, None, None), evaluation_prompt(Q)
    assert train != ask
    assert train.replace("  \n\n", " \n\n", 1).replace(" " * 16 + "\n", "\n") == ask
    assert "noqa" not in train + ask + training_prompt(Q, INPUT, OUT) + evaluation_prompt(Q, INPUT)
    assert training_prompt(Q, None, OUT) != BEFORE_B6F55CD


def test_the_clean_template_is_one_text_for_training_and_evaluation() -> None:
    assert evaluation_prompt(Q, template="alpaca") == ALPACA_NO_INPUT
    assert evaluation_prompt(Q, INPUT, template="alpaca") == ALPACA_WITH_INPUT
    assert training_prompt(Q, None, OUT, template="alpaca") == ALPACA_NO_INPUT + OUT
    assert training_prompt(Q, INPUT, None, template="alpaca") == ALPACA_WITH_INPUT
