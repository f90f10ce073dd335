"""gbsd_core/prompts/parser.py against A1111's documented emphasis syntax: its docstring's own examples
(modules/prompt_parser.py, `parse_prompt_attention`), the README's table, and what gbsd refuses."""
from __future__ import annotations

import re

import pytest

from gbsd_core.prompts.parser import (
    ExtraNetwork,
    Fragment,
    PromptError,
    parse_emphasis,
    read_syntax,
    split_extra_networks,
)


def pairs(text: str) -> list[list]:
    return [["BREAK", -1] if f.is_break else [f.text, f.weight] for f in parse_emphasis(text)]


# A1111's doctest strings and expected values (prompt_parser.py, parse_prompt_attention), as facts about its syntax.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES, ids=[t for t, _ in A1111_EXAMPLES])
def test_a1111_docstring_examples(text: str, expected: list) -> None:
    assert pairs(text) == expected  # exact floats: the weights multiply in A1111's order


@pytest.mark.parametrize("text, expected", [
    ("(a)", [["a", 1.1]]),
    ("((a))", [["a", 1.1 * 1.1]]),
    ("[a]", [["a", 1 / 1.1]]),
    ("[[a]]", [["a", 1 / 1.1 / 1.1]]),
    ("(a:1.5)", [["a", 1.5]]),
    ("(a: 1.5 )", [["a", 1.5]]),  # spaces around the number (A1111 >= 1.6)
    ("(a:-0.5) b", [["a", -0.5], [" b", 1.0]]),  # negative weights are kept, as in A1111
    ("\\(a\\) \\[b\\] \\\\", [["(a) [b] \\", 1.0]]),
    ("a\\b", [["ab", 1.0]]),  # a backslash before anything else vanishes
    ("a) b] c", [["a) b] c", 1.0]]),  # stray closing brackets are text
    ("[a (b", [["a ", 1 / 1.1], ["b", 1.1 / 1.1]]),  # unclosed: round brackets close first, then square
    ("a:1.5) b", [["a:1.5) b", 1.0]]),  # a weight with no open bracket is text
    ("(a:1e9)", [["a:1e9", 1.1]]),  # not a number to A1111's pattern: text, the bracket's 1.1
    ("(a:nan) (b:inf)", [["a:nan", 1.1], [" ", 1.0], ["b:inf", 1.1]]),
    ("", [["", 1.0]]),
])
def test_documented_rules(text: str, expected: list) -> None:
    assert pairs(text) == expected


def test_break() -> None:
    assert pairs("a, b BREAK c") == [["a, b", 1.0], ["BREAK", -1], ["c", 1.0]]
    assert pairs("a BREAK BREAK b") == [["a", 1.0], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert pairs("BREAKFAST breaks") == [["BREAKFAST breaks", 1.0]]  # the capitalised word only
    # gbsd's deviation: A1111 multiplies its BREAK marker by the bracket (-1.1) and then encodes the word "break"
    assert pairs("x (a BREAK b) y") == [["x ", 1.0], ["a", 1.1], ["BREAK", -1], ["b", 1.1], [" y", 1.0]]


@pytest.mark.parametrize("text, part", [
    ("(a:1.2.3)", "'1.2.3'"), ("(a:.)", "'.'"), ("(a:+.)", "'+.'"), ("x (a:1..) y", "'1..'"),
])
def test_unreadable_weights_are_refused(text: str, part: str) -> None:
    # A1111 raises a Python ValueError from float() on these; gbsd names the number
    with pytest.raises(PromptError, match=f"weight {re.escape(part)}.* is not a number"):
        parse_emphasis(text)


@pytest.mark.parametrize("text", ["(a:101)", "(a:-150)", "((a:20):20)", "(a:" + "9" * 400 + ")"])
def test_absurd_weights_are_refused(text: str) -> None:
    with pytest.raises(PromptError, match=r"beyond \+-100"):
        parse_emphasis(text)


def test_weights_at_the_limit_are_kept() -> None:
    assert pairs("(a:100) (b:-100)") == [["a", 100.0], [" ", 1.0], ["b", -100.0]]


def test_extra_network_tags_are_taken_out() -> None:
    text, tags = split_extra_networks("a <lora:film grain:0.8> cat, <hypernet:x:1><lora:y:0.5:te=1>")
    assert text == "a  cat, "  # removed outright, as A1111 does
    assert tags == [ExtraNetwork("lora", ("film grain", "0.8")), ExtraNetwork("hypernet", ("x", "1")),
                    ExtraNetwork("lora", ("y", "0.5", "te=1"))]
    assert tags[0].name == "film grain" and str(tags[2]) == "<lora:y:0.5:te=1>"
    assert split_extra_networks("a <3 heart, <b>") == ("a <3 heart, <b>", [])  # not tags


@pytest.mark.parametrize("prompt, match", [
    ("a <hypernet:x:1> cat", "<hypernet:x:1> is an A1111 extra-network tag of kind 'hypernet'"),
    ("a cat AND a dog", "'AND'"),
])
def test_refused_syntax(prompt: str, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        read_syntax(prompt, where="prompt")


def test_lora_tags_are_handed_on_not_refused() -> None:
    # since the LoRA wing (issue 21) applies them: taken out of the text, returned for the LoRA code
    fragments, tags = read_syntax("a <lora:grain:0.8> cat <lyco:old:1>", where="prompt")
    assert fragments == [Fragment("a  cat ")] and tags == [ExtraNetwork("lora", ("grain", "0.8")),
                                                          ExtraNetwork("lyco", ("old", "1"))]


def test_emphasis_modes() -> None:
    assert read_syntax("a (b:1.5) BREAK c", "none")[0] == [Fragment("a (b:1.5) BREAK c")]  # all text
    assert read_syntax("a (b:1.5)", "ignore")[0] == parse_emphasis("a (b:1.5)")  # read; encode.py skips the weights
    with pytest.raises(ValueError, match="emphasis must be one of original, no_norm, ignore, none"):
        read_syntax("a", "Original")
    # "none" reads no brackets, so a weight it cannot read is text there
    assert read_syntax("(a:1.2.3)", "none")[0][0].text == "(a:1.2.3)"
