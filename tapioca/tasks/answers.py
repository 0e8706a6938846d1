"""Answer rules: how a generated response becomes an answer and a score, selectable per text task.

* ``checker`` (the default): tapioca's checker, :func:`tapioca.tasks.text_sources.check_answer` (reasoning-gym's
  own scorer on the extracted number, numeric or normalised-text comparison otherwise); it reads the response
  up to the first stop sequence, where a few-shot continuation starts the next example. Multiple choice is
  then scored by choice log-likelihood, not by generation.
* ``first_letter`` (TALE, multiple choice): the first capital letter A-Z anywhere in the response names the
  choice (``" B) 7"`` -> choice 1); correct when it is the gold choice's letter. No letter, or a letter past the
  last choice, is wrong.
* ``final_number`` (TALE, math): the last number in the whole response (``1,234``, ``-3.5``; normalised as the
  checker does, ``"7.0"`` -> ``"7"``), compared with the gold answer as a number (as text when the gold is not
  a number). No number is wrong.

Each rule also says when a response prefix already decides the answer (:attr:`AnswerRule.done`): greedy
decoding may stop a row there without changing its score (the first letter once one appeared; the checker once
the response holds a stop sequence after some text; the final number never).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

from tapioca.errors import ConfigError
from tapioca.tasks.text_sources import LETTERS, STOP, TextExample, check_answer, normalize_number

__all__ = ["ANSWER_RULES", "AnswerRule", "first_letter", "final_number", "get_rule", "rule_for"]

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")  # 1,234.5 | -12 | 3.25
LETTER = re.compile(r"[A-Z]")

Check = Callable[[TextExample, str], tuple[str | None, float]]  # (example, response) -> (extracted, score)


@dataclass(frozen=True)
class AnswerRule:
    """A rule: ``check(example, response)`` -> (extracted answer or None, score in [0, 1]; 1 is correct);
    ``kinds``: the task kinds it applies to; ``done(response_prefix)``: True once no continuation of the
    prefix can change the rule's result (greedy decoding may stop there)."""

    name: str
    kinds: tuple[str, ...]
    check: Check
    done: Callable[[str], bool]


def first_letter(response: str) -> str | None:
    """The first capital letter A-Z in ``response`` (TALE's multiple-choice rule), or None."""
    found = LETTER.search(response)
    return found.group(0) if found else None


def final_number(response: str) -> str | None:
    """The last number in ``response`` (TALE's math rule), normalised (``"1,000.0"`` -> ``"1000"``), or None."""
    numbers = NUMBER.findall(response)
    return normalize_number(numbers[-1]) if numbers else None


def _as_float(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _check_first_letter(example: TextExample, response: str) -> tuple[str | None, float]:
    if example.choices is None:
        raise ConfigError("answer_rule: 'first_letter' reads a choice letter; this example is short answer "
                          "(use 'final_number' or 'checker')")
    letter = first_letter(response)
    if letter is None:
        return None, 0.0
    index = LETTERS.index(letter)
    return letter, float(index == int(example.answer))


def _check_final_number(example: TextExample, response: str) -> tuple[str | None, float]:
    if example.choices is not None:
        raise ConfigError("answer_rule: 'final_number' reads a number; this example is multiple choice "
                          "(use 'first_letter')")
    number = final_number(response)
    if number is None:
        return None, 0.0
    gold = str(example.answer).strip()
    value, target = _as_float(number), _as_float(gold)
    if target is None:
        return number, float(number == gold)
    return number, float(value == target)


def _checker_done(response: str) -> bool:
    """The checker reads :func:`truncate`: the stripped response up to its first stop sequence ("\n\n",
    "\nQuestion:"). Once the response, after its leading whitespace, holds a stop sequence, every continuation
    is cut there (or, if all whitespace, stripped back to it), so the extracted answer cannot change."""
    text = response.lstrip()
    return any(stop in text for stop in STOP)


RULES: dict[str, AnswerRule] = {
    "checker": AnswerRule("checker", ("short_answer",), check_answer, _checker_done),
    "first_letter": AnswerRule("first_letter", ("multiple_choice",), _check_first_letter,
                               lambda response: LETTER.search(response) is not None),
    "final_number": AnswerRule("final_number", ("short_answer",), _check_final_number, lambda response: False),
}
ANSWER_RULES = tuple(RULES)


def get_rule(name: str) -> AnswerRule:
    """The rule called ``name``; a wrong name lists the valid ones."""
    if name not in RULES:
        raise ConfigError(f"answer_rule: unknown rule {name!r}; allowed: {list(RULES)}")
    return RULES[name]


def rule_for(name: str, kind: str) -> AnswerRule:
    """The rule ``name`` for a task of ``kind`` ("multiple_choice" or "short_answer"); a rule that cannot read
    that kind's answers is a :class:`ConfigError` naming the rules that can."""
    rule = get_rule(name)
    if kind not in rule.kinds:
        allowed = [r.name for r in RULES.values() if kind in r.kinds]
        extra = " (or 'checker': choice log-likelihood)" if kind == "multiple_choice" else ""
        raise ConfigError(f"answer_rule: {name!r} does not apply to {kind.replace('_', ' ')} tasks; allowed: "
                          f"{allowed}{extra}")
    return rule
