"""gbsd_core/prompts/parser.py against A1111's documented emphasis syntax: its docstring's own examples
(modules/prompt_parser.py, `parse_prompt_attention`), the README's table, and what gbsd refuses."""
from __future__ import annotations

import re

import pytest

from gbsd_core.params import GenerationParams
from gbsd_core.prompts.parser import (
    LORA_KINDS,
    ExtraNetwork,
    Fragment,
    PromptError,
    check_extra_networks,
    check_lora_tags_taken_out,
    parse_emphasis,
    read_syntax,
    split_extra_networks,
)
from gbsd_core.prompts.schedule import prompt_schedule


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


def test_a_kind_filter_takes_out_those_tags_only() -> None:
    text, tags = split_extra_networks("a <lora:x:1> b <hypernet:h:1> c <lyco:y> d", LORA_KINDS)
    assert text == "a  b <hypernet:h:1> c  d" and tags == [ExtraNetwork("lora", ("x", "1")), ExtraNetwork("lyco", ("y",))]


# Tags as A1111 finds them (extra_networks.parse_prompt: re_extra_net over the raw prompt, before the emphasis and the
# schedule are read): escapes and brackets do not protect a tag, and its args run to the first '>'.
@pytest.mark.parametrize("prompt, fragments, tags", [
    ("a \\<lora:x:1> cat", [["a  cat", 1.0]], [("lora", ("x", "1"))]),  # the backslash left alone, then dropped
    ("\\(<lora:x:1>\\)", [["()", 1.0]], [("lora", ("x", "1"))]),  # escaped brackets around it: text
    ("a (cat <lora:x:0.5>:1.3)", [["a ", 1.0], ["cat ", 1.3]], [("lora", ("x", "0.5"))]),  # emphasis: not the LoRA's
    ("[<lora:x:1>] cat", [[" cat", 1.0]], [("lora", ("x", "1"))]),  # the empty bracket pair weighs nothing
    ("<lora:a(b):0.5> cat", [[" cat", 1.0]], [("lora", ("a(b)", "0.5"))]),  # a bracket in a name is the name's
    ("a <hypernet:<lora:x:1> cat", None, [("hypernet", ("<lora", "x", "1"))]),  # one tag, of kind hypernet
])
def test_tags_are_found_as_a1111_finds_them(prompt: str, fragments: list | None, tags: list) -> None:
    text, found = split_extra_networks(prompt)
    assert [(t.kind, t.args) for t in found] == tags
    if fragments is not None:
        assert [[f.text, f.weight] for f in read_syntax(prompt)[0]] == fragments
    else:
        with pytest.raises(PromptError, match="kind 'hypernet'"):
            read_syntax(prompt)


def test_tags_inside_prompt_editing_apply_for_the_whole_run() -> None:
    # A1111 takes the tags out before it reads the schedule: a LoRA named in [from:to:when] is not scheduled
    prompt = "a [cat <lora:x:0.5>:dog <lora:y:1>:2], (bokeh:1.2)"
    assert [t.args[0] for t in split_extra_networks(prompt)[1]] == ["x", "y"]
    assert prompt_schedule(prompt, 10) == [(2, "a cat , (bokeh:1.2)"), (10, "a dog , (bokeh:1.2)")]


def test_a_tag_in_the_negative_prompt_is_refused_by_name() -> None:
    # A1111 reads tags in the positive prompts only and encodes a negative prompt's as text: it applies no LoRA
    # from there. gbsd refuses the tag rather than encode "<lora:x:1>" as words.
    message = "negative: <lora:x:1> is a LoRA tag; A1111 applies LoRAs from the prompt only"
    with pytest.raises(PromptError, match=re.escape(message)):
        check_extra_networks(split_extra_networks("ugly <lora:x:1>")[1], "negative")
    with pytest.raises(ValueError, match=re.escape(message)):
        GenerationParams("a cat", negative="ugly <lora:x:1>")
    with pytest.raises(ValueError, match="negative: <hypernet:h:1> is an A1111 extra-network tag of kind 'hypernet'"):
        GenerationParams("a cat", negative="<hypernet:h:1>")
    assert GenerationParams("a cat <lora:x:1>", focus="a cat <lyco:y:0.5>").prompt == "a cat <lora:x:1>"  # syntax


def test_a_lora_tag_that_reaches_the_text_path_is_refused() -> None:
    with pytest.raises(PromptError, match=re.escape("focus: <lora:x:1> is a LoRA tag, which the pipeline does not")):
        check_lora_tags_taken_out("a cat <lora:x:1>", "focus")
    check_lora_tags_taken_out("a cat, <3, 2:1 <b>")  # no tags: nothing to say


def test_emphasis_modes() -> None:
    assert read_syntax("a (b:1.5) BREAK c", "none")[0] == [Fragment("a (b:1.5) BREAK c")]  # all text
    assert read_syntax("a (b:1.5)", "ignore")[0] == parse_emphasis("a (b:1.5)")  # read; encode.py skips the weights
    with pytest.raises(ValueError, match="emphasis must be one of original, no_norm, ignore, none"):
        read_syntax("a", "Original")
    # "none" reads no brackets, so a weight it cannot read is text there
    assert read_syntax("(a:1.2.3)", "none")[0][0].text == "(a:1.2.3)"
