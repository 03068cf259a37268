"""Answer extraction: the paper's rules on tables of generations, and what strict mode changes."""

from __future__ import annotations

import pytest

from workers.evaluate import EvalResult, TaskResult
from workers.scoring import extract, is_correct
from workers.tasks import TASKS

GSM8K, AQUA, BOOLQ = TASKS["gsm8k"], TASKS["aqua"], TASKS["boolq"]

# (generation, what the paper's extract_answer_number takes): the last -?\d+\.?\d* after removing commas.
NUMBER_PAPER = [
    ("The answer is 42.", "42."),
    ("42", "42"),
    ("The answer is 1,234.", "1234."),
    ("He has 3 apples and buys 4 more, so 7.", "7."),
    ("-5", "-5"),
    ("It dropped to -12.5 degrees", "-12.5"),
    ("3.14159", "3.14159"),
    ("The answer is $18.", "18."),
    ("50%", "50"),
    ("7 km", "7"),
    ("no number here", None),
    ("", None),
    ("The answer is 576. Next question: 12 + 3", "3"),  # the paper takes a trailing number
    ("1,000,000", "1000000"),
    ("0", "0"),
    ("0.5", "0.5"),
    (".5", "5"),  # no leading digit: the regex needs one
    ("5.", "5."),
    ("x=10, y=20", "20"),
    ("10 - 3 = 7", "7"),
    ("answer: 8\n", "8"),
    ("It is 2/3", "3"),
    ("He paid 4 dollars for 2 pens", "2"),
    ("1e5", "5"),
    ("The answer is 99 bottles", "99"),
    ("Total = 45.00", "45.00"),
    ("- 4", "4"),
    ("--4", "-4"),
    ("Step 1: 2 + 2 = 4. Step 2: 4 * 2 = 8. The answer is 8.", "8."),
    ("The answer is -0.25", "-0.25"),
    ("a1b2c3", "3"),
    ("version 2.0.1", "1"),
    ("$1,234.56", "1234.56"),
    ("12345678901234567890", "12345678901234567890"),
    ("The answer is twelve", None),
    ("3 + 4 = 7 and 7 + 1 = 8", "8"),
    ("Answer: 100\nQuestion: What is 5?", "5"),
    ("The result is 6.0", "6.0"),
    ("6 apples", "6"),
    ("In 2023 he was 40", "40"),
    ("A: He needs 24 tiles. The answer is 576.", "576."),
]

# Strict: after the last "### Response:", "The answer is X" wins, units and a final period do not stick.
NUMBER_STRICT = [
    ("The answer is 42.", "42"),
    ("The answer is 576. Next question: 12 + 3", "576"),
    ("The answer is $18.", "18"),
    ("Answer: 100\nQuestion: What is 5?", "100"),
    ("answer is 1,234 apples", "1234"),
    ("The answer is -0.25", "-0.25"),
    ("So the answer is 7 km.", "7"),
    ("5.", "5"),
    ("42", "42"),
    ("He has 3 apples and buys 4 more, so 7.", "7"),
    ("The answer is: 9", "9"),
    ("### Response:\nThe answer is 3", "3"),
    ("What is 12 + 4?\n### Response:\n16", "16"),
    ("Q: 5 apples and 6 pears\n### Response:\nno idea", None),
    ("no number here", None),
    ("", None),
    ("The answer is 8. Then the answer is 9.", "9"),
    ("answer: 1.5", "1.5"),
    ("The answer is (12)", "12"),
    ("Total = 45.00", "45.00"),
    ("Answer is 3.", "3"),
    ("The Answer Is 77", "77"),
    ("the answer is 0", "0"),
    ("1,000,000", "1000000"),
    ("The answer is 50%.", "50"),
    ("In 2023 he was 40", "40"),
    ("3 + 4 = 7 and 7 + 1 = 8", "8"),
    ("The answer is -12", "-12"),
    ("answer:-3", "-3"),
    ("The answer is 4.5 hours.", "4.5"),
    ("He paid 4 dollars for 2 pens. The answer is 4.", "4"),
    ("Step 1: 2 + 2 = 4. The answer is 4. Step 2: double check 4 * 2 = 8", "4"),
    ("The answer is $1,234.56", "1234.56"),
    ("6 apples.", "6"),
    ("The result is 6.0.", "6.0"),
    ("answer is 10 and not 11", "10"),
    ("x = 5\n### Response:\ny = 6", "6"),
    ("The answer is 2/3", "2"),
    ("0.5", "0.5"),
    ("The answer is 99 bottles", "99"),
    ("A: He needs 24 tiles. The answer is 576.", "576"),
]

# AQuA: the paper takes the first capital A-E anywhere.
LETTER_PAPER = [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("(C)", "C"),
    ("Answer: D", "A"),  # the capital A of "Answer" comes first
    ("E) 12", "E"),
    ("A", "A"),
    ("Because x = 3, the answer is (C).", "B"),  # the capital B of "Because" wins
    ("Den answer (A)", "D"),
    ("the answer is (e)", None),
    ("none", None),
    ("", None),
    ("So it is B or C", "B"),
    ("Choose C.", "C"),
    ("xyz D", "D"),
    ("Answer Choices: (A) 1 (B) 2", "A"),
    ("The answer is E", "E"),
    ("Clearly A", "C"),
    ("The correct option: B", "B"),
    ("ABCDE", "A"),
    ("Each option... B", "E"),
    ("Rationale: 2+2=4. The answer is (D).", "D"),
    ("(A)", "A"),
    ("(B)", "B"),
    ("(D)", "D"),
    ("(E)", "E"),
    ("A)", "A"),
    ("B)", "B"),
    ("C)", "C"),
    ("D)", "D"),
    ("E)", "E"),
    ("answer: c", None),
    ("the answer is b", None),
    ("Then (E)", "E"),
    ("Answer is (A) since", "A"),
    ("Total is 5, answer C", "C"),
    ("So the answer must be D", "D"),
    ("Option E is right", "E"),
    ("1 2 3 B", "B"),
    ("x Y z E", "E"),
    ("Done: A", "D"),
    ("    C    ", "C"),
]

LETTER_STRICT = [
    ("The answer is (B).", "B"),
    ("Because x = 3, the answer is (C).", "C"),
    ("Den answer (A)", "A"),
    ("Clearly A", None),
    ("Each option... B", None),
    ("Done: A", None),
    ("(C)", "C"),
    ("Answer: D", "D"),
    ("E) 12", "E"),
    ("Rationale: 2+2=4. The answer is (D).", "D"),
    ("The answer is E", "E"),
    ("answer: B", "B"),
    ("Answer is (A) since", "A"),
    ("So it is B or C", None),
    ("", None),
    ("none", None),
    ("(A)", "A"),
    ("(B)", "B"),
    ("(D)", "D"),
    ("(E)", "E"),
    ("A)", "A"),
    ("B)", "B"),
    ("C)", "C"),
    ("D)", "D"),
    ("Then (E)", "E"),
    ("Because (A) is wrong, (B)", "A"),
    ("The answer is (C) not (D)", "C"),
    ("Answer Choices: (A) 1 (B) 2\n### Response:\nThe answer is (B)", "B"),
    ("Question (A) 1 (B) 2\n### Response:\nI think D", None),
    ("ABCDE", None),
    ("The answer is B.", "B"),
    ("The answer is: E", "E"),
    ("answer: (C)", "C"),
    ("Every answer is (D)", "D"),
    ("BEST: (E)", "E"),
    ("Correct: C)", "C"),
    ("Calculation gives 12, so (B)", "B"),
    ("Dividing, we get (A)", "A"),
    ("Answer:A", "A"),
    ("It is (E)!", "E"),
    ("Ends with (D)", "D"),
]

CHOICE_PAPER = [
    ("the correct answer is true", "true"),
    ("the correct answer is false", "false"),
    ("false", "false"),
    ("True", None),  # case matters in the paper's regex
    ("FALSE", None),
    ("it is not true, it is false", "true"),  # the first match wins
    ("untrue", "true"),  # no word boundaries
    ("falsehood", "false"),
    ("", None),
    ("maybe", None),
    ("true false", "true"),
    ("false true", "false"),
    ("the answer: true.", "true"),
    ("Answer: false!", "false"),
    ("truefalse", "true"),
    ("It's true", "true"),
    ("so false", "false"),
    ("neither", None),
    ("t r u e", None),
    ("correct answer is TRUE", None),
]

CHOICE_STRICT = [
    ("the correct answer is true", "true"),
    ("True", "true"),
    ("FALSE", "false"),
    ("untrue", None),
    ("falsehood", None),
    ("it is not true, it is false", "true"),
    ("", None),
    ("maybe", None),
    ("the answer: True.", "true"),
    ("Answer: False!", "false"),
    ("truefalse", None),
    ("It's TRUE", "true"),
    ("The Correct Answer Is False", "false"),
]


@pytest.mark.parametrize(("generation", "expected"), NUMBER_PAPER)
def test_math_extraction_as_the_paper(generation, expected) -> None:
    assert extract(GSM8K, generation, "paper") == expected


@pytest.mark.parametrize(("generation", "expected"), NUMBER_STRICT)
def test_math_extraction_strict(generation, expected) -> None:
    assert extract(GSM8K, generation, "strict") == expected


@pytest.mark.parametrize(("generation", "expected"), LETTER_PAPER)
def test_aqua_extraction_as_the_paper(generation, expected) -> None:
    assert extract(AQUA, generation, "paper") == expected


@pytest.mark.parametrize(("generation", "expected"), LETTER_STRICT)
def test_aqua_extraction_strict(generation, expected) -> None:
    assert extract(AQUA, generation, "strict") == expected


@pytest.mark.parametrize(("generation", "expected"), CHOICE_PAPER)
def test_commonsense_extraction_as_the_paper(generation, expected) -> None:
    assert extract(BOOLQ, generation, "paper") == expected


@pytest.mark.parametrize(("generation", "expected"), CHOICE_STRICT)
def test_commonsense_extraction_strict(generation, expected) -> None:
    assert extract(BOOLQ, generation, "strict") == expected


@pytest.mark.parametrize(
    ("task", "generation", "words"),
    [
        ("piqa", "the correct answer is solution2", "solution2"),
        ("siqa", "answer3 is right", "answer3"),
        ("arc_c", "answer5", "answer5"),
        ("hellaswag", "ending4 then ending1", "ending4"),
        ("winogrande", "option2", "option2"),
        ("obqa", "answer1", "answer1"),
    ],
)
def test_each_commonsense_set_has_its_answer_words(task, generation, words) -> None:
    assert extract(TASKS[task], generation) == words


@pytest.mark.parametrize(
    ("extracted", "gold", "correct"),
    [("42.", "42.0", True), ("42.0009", "42", True), ("42.002", "42", False), (None, "1", False),
     ("-3", "-3.0", True), ("576", "576.0", True), ("1e", "1", False), ("inf", "1", False)],
)
def test_math_correct_within_a_thousandth(extracted, gold, correct) -> None:
    assert is_correct(GSM8K, extracted, gold) is correct


def test_choice_and_letter_correct_by_equality() -> None:
    assert is_correct(AQUA, "B", "B") and not is_correct(AQUA, "B", "C")
    assert is_correct(BOOLQ, "true", "true") and not is_correct(BOOLQ, None, "true")


def test_macro_accuracy_is_the_mean_of_the_sets() -> None:
    result = EvalResult(tasks={
        "gsm8k": TaskResult("gsm8k", 30 / 100, 30, 100),
        "svamp": TaskResult("svamp", 1 / 2, 1, 2),
        "aqua": TaskResult("aqua", 0.0, 0, 10),
    })
    assert result.macro_accuracy == pytest.approx((0.3 + 0.5 + 0.0) / 3)
    assert result.metrics()["accuracy/svamp"] == 0.5
