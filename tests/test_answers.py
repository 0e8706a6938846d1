"""Tests for tapioca.tasks.answers: TALE's first-letter and final-number rules beside tapioca's checker."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tapioca.errors import ConfigError
from tapioca.tasks.answers import ANSWER_RULES, first_letter, final_number, get_rule, rule_for
from tapioca.tasks.text import TextTask
from tapioca.tasks.text_sources import STOP, TextExample, check_answer

from conftest import mc_task, sa_task

MC = TextExample("which?", 1, ("cat", "dog", "eel", "fox"))
NUM = TextExample("2 + 5?", "7")


@pytest.mark.parametrize("response, letter", [
    (" B", "B"), ("B) dog", "B"), (" the answer is C", "C"), ("The answer is B", "T"), ("\n (d) or D", "D"),
    (" 7 eels", None), ("", None),
])
def test_first_letter_is_the_first_capital_letter(response: str, letter: str | None) -> None:
    assert first_letter(response) == letter


@pytest.mark.parametrize("response, number", [
    (" 7", "7"), (" 3 + 4 = 7.", "7"), ("1,234 and then -5.50", "-5.5"), ("7.0", "7"), ("x = 1,2,3", "3"),
    ("no number", None), ("12\n\nQuestion: 3 + 4", "4"),
])
def test_final_number_is_the_last_number_of_the_whole_generation(response: str, number: str | None) -> None:
    assert final_number(response) == number


def test_rules_score_examples() -> None:
    letter, number, checker = (get_rule(n).check for n in ("first_letter", "final_number", "checker"))
    assert letter(MC, " B") == ("B", 1.0) and letter(MC, " A. cat") == ("A", 0.0) and letter(MC, " e") == (None, 0.0)
    assert letter(MC, " Z") == ("Z", 0.0)  # past the last choice: wrong, not an error
    assert number(NUM, "5 + 2 = 7") == ("7", 1.0) and number(NUM, " 7.00") == ("7", 1.0)
    assert number(NUM, "7, no: 8") == ("8", 0.0) and number(NUM, "seven") == (None, 0.0)
    assert number(TextExample("name?", "Ada"), " 7") == ("7", 0.0)  # a non-numeric gold is compared as text
    assert checker(NUM, " 7\n\nQuestion: 1 + 1? 2") == check_answer(NUM, " 7\n\nQuestion: 1 + 1? 2") == ("7", 1.0)
    assert number(NUM, " 7\n\nQuestion: 1 + 1? 2") == ("2", 0.0)  # TALE's rule reads the whole generation
    with pytest.raises(ConfigError, match="short answer"):
        letter(NUM, " A")
    with pytest.raises(ConfigError, match="multiple choice"):
        number(MC, " 1")


def test_rule_names_and_kinds_are_checked() -> None:
    assert ANSWER_RULES == ("checker", "first_letter", "final_number")
    with pytest.raises(ConfigError, match=r"rule 'last'; allowed: \['checker', 'first_letter', 'final_number'\]"):
        get_rule("last")
    assert rule_for("first_letter", "multiple_choice").name == "first_letter"
    with pytest.raises(ConfigError, match=r"allowed: \['checker', 'final_number'\]"):
        rule_for("first_letter", "short_answer")
    with pytest.raises(ConfigError, match=r"allowed: \['first_letter'\]"):
        rule_for("final_number", "multiple_choice")


def test_answer_rule_is_a_task_config_field() -> None:
    task = mc_task()
    assert task.cfg.answer_rule == "checker"
    with pytest.raises(ConfigError, match="answer_rule: unknown rule 'nope'"):
        dataclasses.replace(task.cfg, answer_rule="nope")
    lettered = TextTask(dataclasses.replace(task.cfg, answer_rule="first_letter"), source=task.source)
    example = lettered.data("id", "select", 0, 1)[0]
    assert lettered.check(example, f" {'ABCD'[int(example.answer)]}") == ("ABCD"[int(example.answer)], 1.0)
    short = sa_task()
    numbered = TextTask(dataclasses.replace(short.cfg, answer_rule="final_number"), source=short.source)
    example = numbered.data("id", "select", 0, 1)[0]
    assert numbered.check(example, f"so {example.answer}") == (example.answer, 1.0)
    assert short.check(example, f" {example.answer}") == check_answer(example, f" {example.answer}")


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(["\n", "\n", " ", "Q", "uestion:", "a", "B", "7", ",", "0", ".", "-"]) for _ in range(n))


def test_done_means_no_continuation_changes_the_answer() -> None:
    """Greedy decoding stops a row once ``done(prefix)``: every extension of such a prefix must give the rule
    the same answer (checked on random prefixes and extensions built from the characters that matter)."""
    rng = random.Random(0)
    examples = {"checker": [NUM, TextExample("name?", "a 7"), TextExample("which?", "B")], "first_letter": [MC],
                "final_number": [NUM]}
    assert any(s in "\n\nQuestion:" for s in STOP)  # the stop sequences this test's alphabet can form
    stopped = 0
    for _ in range(3000):
        prefix = _random_text(rng, rng.randint(0, 12))
        for name, rule in ((n, get_rule(n)) for n in ANSWER_RULES):
            if not rule.done(prefix):
                continue
            stopped += 1
            for _ in range(3):
                full = prefix + _random_text(rng, rng.randint(1, 12))
                for example in examples[name]:
                    assert rule.check(example, full) == rule.check(example, prefix), (name, prefix, full)
    assert stopped > 500
    assert get_rule("checker").done(" 12\n\n") and not get_rule("checker").done("\n\n12\n")
    assert not get_rule("final_number").done("7\n\nQuestion: 1")
