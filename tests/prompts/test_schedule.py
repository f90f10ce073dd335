"""gbsd_core/prompts/schedule.py: A1111's prompt editing ([from:to:when], [a|b]) as a step schedule of texts, and
GBSD's stages split where a text changes."""
from __future__ import annotations

import pytest

from gbsd_core.prompts.parser import PromptError
from gbsd_core.prompts.schedule import check_prompt, has_editing, prompt_schedule, staged, text_at
from gbsd_core.sampling import gbsd_stages

# A1111's doctest strings and expected schedules for 10 steps (modules/prompt_parser.py,
# get_learned_conditioning_prompt_schedules), as facts about its syntax.
A1111_SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULES, ids=[p for p, _ in A1111_SCHEDULES])
def test_a1111_schedules(prompt: str, expected: list) -> None:
    assert [list(e) for e in prompt_schedule(prompt, 10)] == expected


def test_a1111_unhandled_example() -> None:
    # A1111's own tests list "a [{b|d{:.5] c" as "not handling this right now" and expect it scheduled; by its
    # grammar a "|" cannot stand in plain text, so gbsd reads the whole prompt as one text (see the module docstring).
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


@pytest.mark.parametrize("prompt, expected", [
    ("[a:b:5]", [[5, "a"], [20, "b"]]),  # a step number
    ("[a:b:0.25]", [[5, "a"], [20, "b"]]),  # with a dot: a fraction of the steps
    ("[a:b:5.0]", [[20, "a"]]),  # 5.0 x 20 steps, cut to 20: never switches
    ("[a:b:0]", [[20, "b"]]),  # below 1: the new text from the start
    ("[a::7]", [[7, "a"], [20, ""]]),  # removed after step 7
    ("a | b", [[20, "a | b"]]),  # a '|' outside brackets: unreadable, the whole prompt as it is
    ("(a:1.2) [b:c:3] <lora:x:1>", [[3, "(a:1.2) b "], [20, "(a:1.2) c "]]),  # tags out first (':' in them)
])
def test_when(prompt: str, expected: list) -> None:
    assert [list(e) for e in prompt_schedule(prompt, 20)] == expected


def test_text_at_uses_the_first_entry_that_has_not_ended() -> None:
    schedule = [(3, "a"), (10, "b")]  # A1111: step s (from 0) uses the first text with s <= end
    assert [text_at(schedule, i) for i in range(10)] == ["a"] * 4 + ["b"] * 6


def test_staged_without_editing_is_the_papers_two_stages() -> None:
    cond = {(False, ("g", "f")): "E(g)", (True, ("g", "f")): "focus"}
    stages = staged(10, 8, [[(10, "g")], [(10, "f")]], lambda focus, texts: cond[(focus, tuple(texts))])
    assert stages == gbsd_stages("E(g)", "focus", 10, 0.8)
    plain = staged(10, 10, [[(10, "g")]], lambda focus, texts: "E(g)")
    assert [(s.name, s.steps, s.cond) for s in plain] == [("global", range(10), "E(g)")]


def test_staged_splits_where_a_text_changes() -> None:
    # global switches after step 2 (texts from step 3 on), local after step 6, GBSD's switch at step 5
    def cond(focus: bool, texts: list[str]) -> str:
        return f"mix({texts[0]},{texts[1]})" if focus else f"E({texts[0]})"

    stages = staged(10, 5, [[(2, "g1"), (10, "g2")], [(6, "f1"), (10, "f2")]], cond)
    assert [(s.name, s.steps, s.cond) for s in stages] == [
        ("layout", range(0, 3), "E(g1)"), ("layout", range(3, 5), "E(g2)"),
        ("focus", range(5, 7), "mix(g2,f1)"), ("focus", range(7, 10), "mix(g2,f2)")]


def test_img2img_runs_fewer_steps_than_the_schedule() -> None:
    # the schedule is over the requested steps (A1111), indexed by executed step: a 4-step run sees its first texts
    stages = staged(4, 4, [[(3, "a"), (10, "b")]], lambda focus, texts: texts[0])
    assert [(s.steps, s.cond) for s in stages] == [(range(0, 4), "a")]


def test_editing_detected_and_refused_in_the_negative() -> None:
    assert has_editing("a [b:c:5]") and has_editing("[x|y] z") and not has_editing("a [b] (c:1.2)")
    assert not has_editing("a [b")
    check_prompt("a [b:c:5]", "original", 20, "prompt")
    with pytest.raises(PromptError, match="negative: prompt editing .* not supported in the negative prompt"):
        check_prompt("bad [hands:feet:5]", "original", 20, "negative")
    with pytest.raises(PromptError, match="'1.2.3' .* is not a number"):  # every text of the schedule is read
        check_prompt("a [(b:1.2.3):c:5]", "original", 20, "prompt")


def test_absurd_nesting_is_refused_and_long_unclosed_runs_are_read() -> None:
    from gbsd_core.prompts.schedule import MAX_NESTING

    check_prompt("[" * MAX_NESTING + "a" + "]" * MAX_NESTING + " [b:c:2]", "original", 10, "prompt")
    with pytest.raises(PromptError, match=f"focus: brackets nested more than {MAX_NESTING} deep"):
        check_prompt("[" * (MAX_NESTING + 1) + "a:b:3" + "]" * (MAX_NESTING + 1), "original", 10, "focus")
    # 8,000+ characters behind 40 brackets never closed: each position is read once (remembered), so this returns at
    # once; a parser that re-reads what a failed bracket held would try ~3^40 ways here
    text = "([" * 20 + "a " * 4000 + "[b:c:2]"
    assert prompt_schedule(text, 10)[0] == (2, "([" * 20 + "a " * 4000 + "b")  # brackets are text, the edit works
