"""Prompt editing, A1111's step schedule of prompts: `[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`.

A1111 (modules/prompt_parser.py, `get_learned_conditioning_prompt_schedules`) turns one prompt into a list of
(end step, text) pairs; the sampler's step s (counted from 0) uses the first text whose end step is >= s:

    [from:to:when]   `from` up to step `when`, then `to`     [to:when] adds `to` after `when`; [from::when] removes
    when             with a dot a fraction of the steps ("0.25" of 20 -> 5), else a step number ("5"); cut to the
                     step count, int() of the product; a value below 1 switches at step 0 (so `to` from the start)
    [a|b|c]          alternate every step: step s uses the ((max(s, 1) - 1) mod 3)-th: a a b c a b c ... (A1111's own
                     order, its first step repeats the first text)
    nesting          both may nest, in each other and in emphasis brackets, which stay as text for parser.py

The grammar is A1111's (a lark Earley grammar; here a small recursive descent over the same rules): brackets that do
not form one of these constructs are text at the top level, and a prompt that still cannot be read -- a `|` outside
brackets, a lone backslash at the end -- is one text for all steps, as in A1111. Where A1111's grammar is ambiguous
(`[b:3]` is also five characters of text), the construct wins, as A1111's own tests expect.

GBSD runs these schedules through its stages (`staged`): the steps split wherever the global or a local prompt
changes, and at the layout/focus switch; each piece is a `sampling.Stage` with its own conditioning. The negative
prompt has one embedding for the whole run in gbsd (`sampling.denoise`), so editing in it is refused by name.
A1111 encodes all texts of one schedule as one batch (their emphasis means taken together); gbsd encodes each alone.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..sampling import Cond, Stage
from .parser import PromptError, check_extra_networks, read_syntax, split_extra_networks

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # A1111's `plain`: escapes kept for parser.py
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # lark's SIGNED_NUMBER
_SPACE = re.compile(r"\s*")
MAX_NESTING = 100  # brackets nested deeper than this are refused (the parser recurses once per level)


@dataclass(frozen=True)
class Scheduled:
    before: tuple | None  # a sequence of nodes, or None where `[to:when]` has no `from`
    after: tuple
    when: str  # the number as written


@dataclass(frozen=True)
class Alternate:
    options: tuple  # sequences of nodes


Node = str | Scheduled | Alternate  # text (emphasis brackets included), or a construct


class _Reader:
    """Recursive descent over A1111's schedule grammar; each rule returns (nodes, new position) or None. `prompt(i)`
    depends on i alone (the grammar is context-free), so it is remembered: a position is read once, and a long run
    of unclosed brackets costs linear time, not quadratic."""

    def __init__(self, text: str, where: str = "prompt") -> None:
        self.text, self.where = text, where
        self.read: dict[int, tuple[tuple, int]] = {}
        self.depth = 0

    def prompt(self, i: int) -> tuple[tuple, int]:
        """As many items as parse from i: plain text, whitespace, or a bracket construct."""
        if i in self.read:
            return self.read[i]
        start, items = i, []
        while i < len(self.text):
            m = _PLAIN.match(self.text, i)
            if m:
                items.append(m.group(0))
                i = m.end()
                continue
            got = self.bracket(i)
            if got is None:
                break
            items.extend(got[0])
            i = got[1]
        self.read[start] = (tuple(items), i)
        return self.read[start]

    def bracket(self, i: int) -> tuple[tuple, int] | None:
        """A construct opening at i: emphasis "(" prompt [":" prompt] ")" and "[" prompt "]" (kept as text),
        `scheduled` or `alternate`. The first inner prompt is the same for all of them, read once."""
        if self.text[i] not in "([":
            return None
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise PromptError(f"{self.where}: brackets nested more than {MAX_NESTING} deep")
        try:
            first, j = self.prompt(i + 1)
            after = self.text[j:j + 1]
            if self.text[i] == "(":
                if after == ":":
                    second, k = self.prompt(j + 1)
                    return (("(", *first, ":", *second, ")"), k + 1) if self.text.startswith(")", k) else None
                return (("(", *first, ")"), j + 1) if after == ")" else None
            if after == "]":
                return ("[", *first, "]"), j + 1
            if after == "|":
                return self.alternate(first, j)
            return self.scheduled(first, j) if after == ":" else None
        finally:
            self.depth -= 1

    def scheduled(self, first: tuple, j: int) -> tuple[tuple, int] | None:
        """After "[" prompt ":": `prompt ":" number "]"` (from and to), else `number "]"` (to alone)."""
        second, k = self.prompt(j + 1)
        if self.text.startswith(":", k):
            end = self.number_close(k + 1)
            if end is not None:
                return (Scheduled(first, second, end[0]),), end[1]
        end = self.number_close(j + 1)
        return None if end is None else ((Scheduled(None, first, end[0]),), end[1])

    def number_close(self, i: int) -> tuple[str, int] | None:
        i = _SPACE.match(self.text, i).end()
        m = _NUMBER.match(self.text, i)
        if m is None:
            return None
        j = _SPACE.match(self.text, m.end()).end()
        return (m.group(0), j + 1) if self.text.startswith("]", j) else None

    def alternate(self, first: tuple, j: int) -> tuple[tuple, int] | None:
        """After "[" prompt "|": more options, each after a "|", then "]"."""
        options = [first]
        while self.text.startswith("|", j):
            option, j = self.prompt(j + 1)
            options.append(option)
        return ((Alternate(tuple(options)),), j + 1) if self.text.startswith("]", j) else None

    def start(self) -> tuple | None:
        """The whole text: items, with brackets that form no construct kept as text; None if it cannot be read."""
        items: list[Node] = []
        i = 0
        while i < len(self.text):
            got, i = self.prompt(i)
            items.extend(got)
            if i < len(self.text):
                if self.text[i] not in "[]():":
                    return None  # a "|" outside brackets, a lone backslash at the end
                items.append(self.text[i])
                i += 1
        return tuple(items)


def _walk(nodes: tuple, visit: Callable[[Node], None]) -> None:
    for node in nodes:
        visit(node)
        if isinstance(node, Scheduled):
            _walk(node.before or (), visit)
            _walk(node.after, visit)
        elif isinstance(node, Alternate):
            for option in node.options:
                _walk(option, visit)


def _when(s: str, steps: int) -> int:
    v = float(s) * steps if "." in s else float(s)
    return min(steps, int(v)) if v == v and abs(v) != float("inf") else steps


def _text_at(nodes: tuple, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            out.append(_text_at(node.before or (), step, steps) if step <= _when(node.when, steps)
                       else _text_at(node.after, step, steps))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, where: str = "prompt") -> list[tuple[int, str]]:
    """[(end step, text)] for a run of `steps` steps, ends ascending, the last = steps: A1111's schedule of one
    prompt (its extra-network tags taken out first, as A1111 does). A prompt without editing is [(steps, prompt)]."""
    text = split_extra_networks(prompt)[0]
    nodes = _Reader(text, where).start() if "[" in text else None
    if nodes is None:
        return [(steps, text)]
    ends = {steps}

    def collect(node: Node) -> None:
        if isinstance(node, Scheduled) and _when(node.when, steps) >= 1:
            ends.add(_when(node.when, steps))
        elif isinstance(node, Alternate):
            ends.update(range(1, steps + 1))

    _walk(nodes, collect)
    return [(end, _text_at(nodes, end, steps)) for end in sorted(ends)]


def has_editing(prompt: str, where: str = "prompt") -> bool:
    """Whether a prompt uses prompt editing ([from:to:when] or [a|b]) anywhere."""
    text = split_extra_networks(prompt)[0]
    nodes = _Reader(text, where).start() if "[" in text else None
    found = []
    _walk(nodes or (), lambda node: found.append(node) if not isinstance(node, str) else None)
    return bool(found)


def check_prompt(prompt: str, emphasis: str, steps: int, where: str = "prompt") -> None:
    """Refuse what gbsd cannot read in a prompt (parser.read_syntax: weights, AND, extra-network tags), in every text
    its schedule holds for a run of `steps` steps; editing in the negative prompt is refused by name."""
    check_extra_networks(split_extra_networks(prompt)[1], where)
    if where == "negative" and has_editing(prompt, where):
        raise PromptError("negative: prompt editing ([from:to:when], [a|b]) is not supported in the negative "
                          "prompt (gbsd uses one negative embedding for the whole run)")
    for text in dict.fromkeys(text for _, text in prompt_schedule(prompt, steps, where)):
        read_syntax(text, emphasis, where)


def text_at(schedule: Sequence[tuple[int, str]], i: int) -> str:
    """The text the executed step i (from 0) uses: the first entry whose end step is >= i (A1111's
    reconstruct_cond_batch)."""
    return next((text for end, text in schedule if i <= end), schedule[-1][1])


def staged(n: int, n_layout: int, schedules: Sequence[Sequence[tuple[int, str]]],
           stage_cond: Callable[[bool, list[str]], Cond], plain: str = "global") -> list[Stage]:
    """GBSD's stages split wherever a prompt's text changes: one `Stage` per run of executed steps (of n) over which
    every schedule keeps its text and the layout/focus split (at n_layout) does not fall. `stage_cond(focus, texts)`
    gives a piece's conditioning from the texts of the schedules at that piece. Pieces are named "layout" / "focus"
    (or `plain` when there is no focus stage, n_layout = n), so probes and traces find the focus stage as before."""
    starts = {0, n_layout} | {end + 1 for schedule in schedules for end, _ in schedule[:-1]}
    starts = sorted(s for s in starts if 0 <= s < n)
    stages = []
    for a, b in zip(starts, [*starts[1:], n]):
        focus = a >= n_layout
        texts = [text_at(schedule, a) for schedule in schedules]
        name = ("focus" if focus else "layout") if n_layout < n else plain
        stages.append(Stage(name, range(a, b), stage_cond(focus, texts)))
    return stages
