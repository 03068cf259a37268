"""Answer extraction and scoring, as the LLM-Adapters evaluation code does it, plus a strict mode.

`paper` mirrors the paper's evaluate.py / commonsense_evaluate.py:
- math (gsm8k, svamp, addsub, multiarith, singleeq, mawps): commas removed, the last match of
  `-?\\d+\\.?\\d*` is the prediction (none: wrong), correct when |prediction - gold| <= 0.001;
- AQuA: the first capital letter A-E anywhere in the generation;
- commonsense: the first match of the set's answer words (`true|false`, `solution1|solution2`, ...).

`strict` fixes the weak spots users of the paper's code reported, one rule each:
1. the prediction is read after the last "### Response:" only, so a number echoed from the question
   (a generation that repeats the prompt) is never taken;
2. an explicit "The answer is X" (or "answer: X") wins over whatever number comes last;
3. units and currency around a number ($1,000, 25%, 3.5 km) do not change it, and a trailing
   sentence period is not part of it ("42." is 42);
4. AQuA takes a letter only as a standalone option ("(B)", "B)", "answer is B"), never the capital
   that starts a sentence ("Because ..." is not B);
5. commonsense words must stand alone ("option10" is not option1) and case is ignored.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from workers.tasks import Task

Scoring = Literal["paper", "strict"]

TOLERANCE = 0.001
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*:?\s*\(?\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_LETTER_STRICT = re.compile(r"(?:(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-E])\b|\(([A-E])\)|\b([A-E])\))")
_RESPONSE = "### Response:"


def extract(task: Task, generation: str, scoring: Scoring = "paper") -> str | None:
    """The answer `generation` gives for `task`, as text; None when it gives none."""
    if scoring == "strict" and _RESPONSE in generation:
        generation = generation.rsplit(_RESPONSE, 1)[1]
    if task.kind == "number":
        return _number(generation, scoring)
    if task.kind == "letter":
        return _letter(generation, scoring)
    return _choice(task.choices, generation, scoring)


def _number(text: str, scoring: Scoring) -> str | None:
    text = text.replace(",", "")
    if scoring == "strict":
        stated = _ANSWER_IS.findall(text)
        if stated:
            return _clean_number(stated[-1])
    found = _NUMBER.findall(text)
    if not found:
        return None
    return _clean_number(found[-1]) if scoring == "strict" else found[-1]


def _clean_number(token: str) -> str:
    return token.replace(",", "").rstrip(".") or token


def _letter(text: str, scoring: Scoring) -> str | None:
    if scoring == "strict":
        for groups in _LETTER_STRICT.findall(text):
            letter = next(g for g in groups if g)
            return letter
        return None
    found = re.findall(r"A|B|C|D|E", text.strip())
    return found[0] if found else None


def _choice(choices: tuple[str, ...], text: str, scoring: Scoring) -> str | None:
    if scoring == "strict":
        pattern = r"\b(" + "|".join(choices) + r")\b"
        found = re.findall(pattern, text.lower())
    else:
        found = re.findall("|".join(choices), text.strip())
    return found[0] if found else None


def is_correct(task: Task, extracted: str | None, gold: str) -> bool:
    """Whether an extracted answer matches the gold one (numbers within 0.001, as the paper)."""
    if extracted is None:
        return False
    if task.kind == "number":
        try:
            value = float(extracted)
        except ValueError:
            return False
        return math.isfinite(value) and abs(float(gold) - value) <= TOLERANCE
    return extracted == gold.strip()
