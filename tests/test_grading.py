"""First-committed-answer extraction and the two graders (vaopd.grading)."""
import pytest

from vaopd.grading import GRADERS, first_committed_answer, grade


@pytest.mark.parametrize("response, expected", [
    # no commitment: the whole response is what gets graded
    ("I count the sides and get nothing definite", "I count the sides and get nothing definite"),
    ("", ""),
    # one box
    ("The angle is \\boxed{60}.", "60"),
    ("so x = \\boxed{ 12 } cm", "12"),
    # several boxes: the first one counts, not a later correction
    ("First \\boxed{3}, but wait, it is \\boxed{4}.", "3"),
    ("\\boxed{A} \\boxed{B} \\boxed{C}", "A"),
    # nested braces are kept whole
    ("\\boxed{\\frac{1}{2}} or maybe \\boxed{2}", "\\frac{1}{2}"),
    ("area \\boxed{2\\sqrt{3}+\\frac{\\pi}{4}}", "2\\sqrt{3}+\\frac{\\pi}{4}"),
    # an escaped brace is a literal brace, not a closing one
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    # \boxed with a space before the brace
    ("\\boxed {7}", "7"),
    # an unbalanced (cut-off) or empty box is no commitment: the next one is used
    ("\\boxed{} then \\boxed{5}", "5"),
    ("The answer is 9.\nAnd \\boxed{8", "9"),
    # answer markers, any case, payload = the rest of the line without $, ** and a final full stop
    ("Answer: 42", "42"),
    ("... so the answer is 15.", "15"),
    ("**Final Answer:** $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("FINAL ANSWER: 8\nsome more text", "8"),
    # a marker directly followed by a box gives the box's content
    ("The answer is $\\boxed{x^{2}}$.", "x^{2}"),
    # whichever commitment starts first wins
    ("Answer: 7\nActually \\boxed{8}", "7"),
    ("\\boxed{8} and then Answer: 7", "8"),
    # a marker with nothing after it on its line is no commitment
    ("Answer:\n\\boxed{5}", "5"),
    # markers need a word boundary
    ("Reanswer: 3 \\boxed{4}", "4"),
])
def test_first_committed_answer(response, expected):
    assert first_committed_answer(response) == expected


@pytest.mark.parametrize("given, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "\\frac12"),
    ("60^\\circ", "60"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("5.0", "5"),
    ("12", "12.00"),
])
def test_mathruler_accepts_equivalent_forms(given, gold):
    assert grade(f"so it is \\boxed{{{given}}}.", gold, "first_boxed_mathruler")


@pytest.mark.parametrize("grader", GRADERS)
def test_graders_reject_a_wrong_answer(grader):
    assert not grade("\\boxed{4}", "5", grader)
    assert grade("\\boxed{5}", "5", grader)


def test_graders_disagree_on_a_later_correction():
    # math-verify reads the final answer of the whole response; the authors' rule the first one.
    response = "The area is \\boxed{\\frac{1}{2}}. Hmm, let me recheck: \\boxed{4}."
    assert grade(response, "0.5", "first_boxed_mathruler")
    assert not grade(response, "0.5", "math_verify")


def test_unknown_grader():
    with pytest.raises(ValueError, match="unknown grader"):
        grade("\\boxed{1}", "1", "exact")
