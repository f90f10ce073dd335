"""A1111's prompt syntax, read into weighted text: emphasis, escapes, BREAK; extra-network tags taken out.

AUTOMATIC1111's stable-diffusion-webui defines what prompts on the web look like (modules/prompt_parser.py,
`parse_prompt_attention`; modules/extra_networks.py). Its documented rules, which this module follows:

    (word)        weight x 1.1          ((word))  x 1.21        [word]  / 1.1
    (word:1.5)    weight x 1.5 (the number replaces the 1.1 of that bracket pair; spaces around it are allowed)
    \\( \\) \\[ \\] \\\\   the literal character;  a backslash before anything else vanishes
    unbalanced    an opening bracket never closed applies to the end of the prompt; a stray closing one is text
    BREAK         (the word, in capitals) ends the current 75-token chunk early (chunks.py)
    <lora:NAME:W> an extra-network tag (A1111's `<kind:args>`): taken out of the text, never encoded; the `lora` ones
                  are handed to the LoRA code, every other kind is refused by name (below)

Weights multiply outward, in the order the brackets close (so `((house:1.3))` is 1.3 x 1.1 x 1.1 =
1.5730000000000004, A1111's own figure). Neighbouring pieces of equal weight are joined before they are tokenized,
as A1111 does: `(unnecessary)(parens)` is the one word "unnecessaryparens" at 1.1.

Where gbsd differs, on purpose:
- A number A1111 cannot read (`(word:1.2.3)`, `(word:.)`) crashes A1111 with a Python error; here it is refused by
  name. Numbers it cannot see as numbers (`(word:1e9)`, `(word:nan)`) are text there and here: "word:1e9" at 1.1.
- An effective weight beyond +-WEIGHT_LIMIT is refused (A1111 applies any number; a weight of 1e9 turns the chunk into
  one token's vector). Negative weights are kept, as A1111 keeps them.
- BREAK inside brackets is a break here. In A1111 the marker is multiplied by the bracket's weight and then no longer
  recognised, so it is encoded as the word "break" with weight -1.1.
- `AND` (A1111's composable prompts: several predictions mixed) is refused by name rather than encoded as a word.

Extra-network tags, the one reader of their syntax (`split_extra_networks`), as A1111's extra_networks.parse_prompt:
each `<kind:arg1:arg2...>` is found in the raw prompt before anything else is read, so no escape or bracket
protects it (`\\<lora:x:1>` and `(<lora:x:1>:1.5)` are tags; the brackets' weight is not the LoRA's), a tag inside
prompt editing applies for the whole run (A1111 takes tags out before it reads the schedule), and `<foo:<lora:x:1>`
is one tag of kind "foo" (its args run to the first '>'). `lora` and `lyco` (A1111's alias for the old LyCORIS
extension) go to the LoRA wing (gbsd_core/lora/tags.py reads NAME:WEIGHT; the command line applies them: the global
prompt's to both GBSD stages, --focus's to the focus stage). Other kinds (`hypernet`, ...) are refused by name (A1111
skips a kind it does not know with a log line). A1111 reads tags in the positive prompts only: in the negative prompt
it encodes one as text, so no LoRA is ever applied from there; gbsd refuses any tag in the negative prompt by name.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# How weights are applied (A1111's emphasis modes, modules/sd_emphasis.py; encode.py): "original" z·w rescaled to z's
# mean, "no_norm" z·w, "ignore" syntax read but weights not applied, "none" no syntax (brackets and BREAK are text)
EMPHASIS = ("original", "no_norm", "ignore", "none")
ROUND = 1.1  # ( ) multiplies by this, [ ] divides by it (A1111's round/square bracket multipliers)
SQUARE = 1 / 1.1
WEIGHT_LIMIT = 100.0  # the largest |weight| accepted: a bound with room (weights past ~2 already burn images)

# A1111 reads a weight as `:` + optional spaces + [+-] and digits/dots + optional spaces + `)` (prompt_parser.py).
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_PLAIN = re.compile(r"[^\\()\[\]:]+")  # text up to the next character with a meaning
_BREAK = re.compile(r"\s*\bBREAK\b\s*")  # the spaces around BREAK go with it
_AND = re.compile(r"\bAND\b")
# An extra-network tag (A1111's extra_networks.re_extra_net): <kind:args>, kind a word, args up to the next '>'.
_TAG = re.compile(r"<(\w+):([^>]+)>")
# The kinds gbsd applies: A1111's LoRA network and `lyco`, the alias it keeps for the old LyCORIS extension
LORA_KINDS = ("lora", "lyco")


class PromptError(ValueError):
    """A prompt gbsd refuses to read (the message names the part); the CLI prints it as a usage error."""


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text at one weight, or a BREAK (`is_break`, no text)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class ExtraNetwork:
    """An extra-network tag such as `<lora:film-grain:0.8>`: kind "lora", args ("film-grain", "0.8")."""

    kind: str
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return f"<{self.kind}:{':'.join(self.args)}>"


def split_extra_networks(prompt: str, kinds: Sequence[str] | None = None) -> tuple[str, list[ExtraNetwork]]:
    """(the prompt without its `<kind:args>` tags, the tags in order). A1111 removes each tag outright, before any
    other parsing (extra_networks.parse_prompt), so the words around it keep their spaces: "a <lora:x:1> cat" is
    "a  cat". With `kinds`, only tags of those kinds are taken out; the others stay in the text as written. This is
    the hand-off to the code that applies LoRAs (gbsd_core/lora/tags.py): it gets the tags, the text encoder never
    does."""
    tags: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        if kinds is not None and m.group(1) not in kinds:
            return m.group(0)
        tags.append(ExtraNetwork(m.group(1), tuple(m.group(2).split(":"))))
        return ""

    return _TAG.sub(take, prompt), tags


def check_extra_networks(tags: list[ExtraNetwork], where: str = "prompt") -> None:
    """Refuse, by name, the tags nothing in gbsd applies: every kind but LORA_KINDS (the LoRA wing's), and in the
    negative prompt (`where` "negative") every tag, since A1111 applies none from there (module docstring)."""
    for tag in tags:
        if tag.kind not in LORA_KINDS:
            raise PromptError(f"{where}: {tag} is an A1111 extra-network tag of kind {tag.kind!r}, which gbsd does not "
                              "apply (remove the tag)")
        if where == "negative":
            raise PromptError(f"negative: {tag} is a LoRA tag; A1111 applies LoRAs from the prompt only (it encodes "
                              "this tag as text): remove it, or give the LoRA a negative weight in the prompt")


def check_lora_tags_taken_out(prompt: str, where: str = "prompt") -> None:
    """The text path applies no LoRA: a `<lora:...>` tag that reaches it (the Python API given a prompt as typed) was
    not handed to the LoRA code, and dropping it silently would make another image than the one asked for."""
    tags = split_extra_networks(prompt, LORA_KINDS)[1]
    if tags:
        raise PromptError(f"{where}: {tags[0]} is a LoRA tag, which the pipeline does not apply: take the tags out "
                          "and merge the LoRAs first (gbsd_core.lora.split_lora_tags, apply_loras), as the command "
                          "line does")


def check_no_and(prompt: str, where: str = "prompt") -> None:
    """A1111 splits a prompt at the word AND into composable prompts, each its own UNet prediction; gbsd has one
    prediction per prompt, so the word is refused rather than silently encoded as text."""
    if _AND.search(prompt):
        raise PromptError(f"{where}: 'AND' (A1111's composable prompts, one prediction per part) is not supported; "
                          "write 'and', or make separate images")


def parse_emphasis(text: str, where: str = "prompt") -> list[Fragment]:
    """A1111's emphasis syntax -> fragments of text at their weights, with BREAK markers (module docstring)."""
    pieces: list[list] = []  # [text, weight] or [None, None] for a BREAK
    rounds: list[int] = []  # where each open ( began in `pieces`
    squares: list[int] = []

    def scale(start: int, by: float) -> None:  # a bracket closes: everything since it opened is multiplied
        for piece in pieces[start:]:
            if piece[0] is not None:
                piece[1] *= by

    def add_text(t: str) -> None:
        for k, part in enumerate(_BREAK.split(t)):
            if k:
                pieces.append([None, None])
            pieces.append([part, 1.0])

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1:i + 2]
            if nxt and nxt in "()[]\\":
                pieces.append([nxt, 1.0])
                i += 2
            else:  # a lone backslash is dropped (A1111 matches it alone and keeps what follows it)
                i += 1
        elif c == "(":
            rounds.append(len(pieces))
            i += 1
        elif c == "[":
            squares.append(len(pieces))
            i += 1
        elif c == ":":
            m = _WEIGHT.match(text, i)
            if m is None:
                add_text(":")
                i += 1
            elif not rounds:  # a weight with no open bracket is text, ":1.5)" and all
                add_text(m.group(0))
                i = m.end()
            else:
                scale(rounds.pop(), _number(m.group(1), text, where))
                i = m.end()
        elif c == ")" and rounds:
            scale(rounds.pop(), ROUND)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop(), SQUARE)
            i += 1
        elif c in ")]":
            add_text(c)
            i += 1
        else:
            m = _PLAIN.match(text, i)
            add_text(m.group(0))
            i = m.end()
    for start in rounds:  # unbalanced: close what is still open, round brackets first (as A1111)
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)

    fragments: list[Fragment] = []
    for t, w in pieces or [["", 1.0]]:
        if t is None:
            fragments.append(Fragment("", is_break=True))
        elif fragments and not fragments[-1].is_break and fragments[-1].weight == w:
            fragments[-1] = Fragment(fragments[-1].text + t, w)  # join runs of equal weight (A1111)
        else:
            if abs(w) > WEIGHT_LIMIT:
                raise PromptError(f"{where}: weight {w:g} on {t.strip()[:40]!r} is beyond +-{WEIGHT_LIMIT:g} (the "
                                  "brackets multiply: check the numbers)")
            fragments.append(Fragment(t, w))
    return fragments


def _number(s: str, text: str, where: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise PromptError(f"{where}: the weight {s!r} in {_around(text, s)!r} is not a number (write e.g. "
                          "(word:1.2), or escape the bracket: \\( \\))") from None


def _around(text: str, s: str) -> str:
    at = text.find(":" + s) if (":" + s) in text else text.find(s)
    start = text.rfind("(", 0, max(at, 0))
    return text[max(start, 0):at + len(s) + 2][:60]


def read_syntax(prompt: str, emphasis: str = "original", where: str = "prompt") -> tuple[list[Fragment],
                                                                                        list[ExtraNetwork]]:
    """A prompt's weighted fragments and its extra-network tags; PromptError for what gbsd refuses (a weight that is
    not a number or beyond the limit, AND, a tag gbsd cannot apply). Needs no model: `GenerationParams` calls it."""
    if emphasis not in EMPHASIS:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS)}, got {emphasis!r}")
    text, tags = split_extra_networks(prompt)
    check_extra_networks(tags, where)
    check_no_and(text, where)
    return ([Fragment(text)] if emphasis == "none" else parse_emphasis(text, where)), tags
