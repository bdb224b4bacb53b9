"""Grading a sampled response against a gold answer.

Two graders (``eval.grader``):

- ``first_boxed_mathruler`` (the method authors' rule): take the response's *first committed
  answer* (``first_committed_answer``) and compare it with the gold answer using
  ``mathruler.grader.grade_answer`` (string normalisation, then a sympy equality check). A later
  correction in the same response does not count: the first commitment is the answer.
- ``math_verify``: parse the whole response with math-verify and compare its final answer with
  the gold answer. When a response holds several boxed answers the two graders can disagree.
"""
from __future__ import annotations

import re

__all__ = ["GRADERS", "first_committed_answer", "grade"]

GRADERS = ("first_boxed_mathruler", "math_verify")

_BOXED = re.compile(r"\\boxed\s*\{")
# Answer markers, matched case-insensitively at a word boundary: "Final answer:", "Answer:" and
# "The answer is". The payload is the rest of the marker's line; a marker with nothing after it on
# its line is not a commitment.
_MARKER = re.compile(r"\b(?:final\s+answer\s*:|answer\s*:|the\s+answer\s+is\b)", re.IGNORECASE)


def _braced(text: str, open_end: int) -> str | None:
    """The text between the ``{`` that ends at ``open_end`` and its matching ``}``.

    Braces escaped with a backslash (``\\{``, ``\\}``) are literal and do not count. None when the
    braces never balance (a response cut off inside the box) or the box is empty.
    """
    depth, i = 1, open_end
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character: "\{" and "\}" are literal braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_end:i].strip() or None
        i += 1
    return None


def _marker_payload(text: str, end: int) -> str | None:
    """The answer after a marker ending at ``end``: the rest of its line, or a box opening it."""
    line = text[end:].split("\n", 1)[0].strip()
    box = _BOXED.match(line.lstrip("$*: "))
    if box:
        return _braced(line.lstrip("$*: "), box.end())
    # Presentation only: surrounding $ and ** (markdown bold), a final full stop.
    value = line.removesuffix(".").strip("$* ")
    return value or None


def first_committed_answer(response: str) -> str:
    """The earliest answer ``response`` commits to; the whole response when it commits to none.

    A commitment is a ``\\boxed{...}`` with balanced braces (nested braces kept: ``\\boxed{\\frac{1}{2}}``
    gives ``\\frac{1}{2}``) or an answer marker (``Final answer:``, ``Answer:``, ``The answer is``,
    any case) followed by text on the same line; whichever starts first wins. A marker directly
    followed by a box gives the box's content. Unbalanced or empty boxes are not commitments.
    """
    candidates = []
    for m in _BOXED.finditer(response):
        value = _braced(response, m.end())
        if value is not None:
            candidates.append((m.start(), value))
            break  # later boxes start later still
    for m in _MARKER.finditer(response):
        value = _marker_payload(response, m.end())
        if value is not None:
            candidates.append((m.start(), value))
            break
    return min(candidates)[1] if candidates else response


def _math_verify(response: str, answer: str) -> bool:
    from math_verify import parse, verify

    gold = parse(answer if "\\boxed" in answer or "$" in answer else f"${answer}$")
    if not gold:
        return False
    return bool(verify(gold, parse(response)))


def _first_boxed_mathruler(response: str, answer: str) -> bool:
    from mathruler.grader import grade_answer

    return bool(grade_answer(first_committed_answer(response), answer))


def grade(response: str, answer: str, grader: str = "math_verify") -> bool:
    """True when ``response`` answers the gold ``answer`` correctly under ``grader`` (``GRADERS``)."""
    if grader == "first_boxed_mathruler":
        return _first_boxed_mathruler(response, answer)
    if grader == "math_verify":
        return _math_verify(response, answer)
    raise ValueError(f"unknown grader {grader!r} (choose from {', '.join(GRADERS)})")
