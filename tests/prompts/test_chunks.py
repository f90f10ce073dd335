"""gbsd_core/prompts/chunks.py: 75-token chunks against a reference written here from A1111's documented rules, and
one context length per run (repeat / empty)."""
from __future__ import annotations

import random

import pytest
import torch

from gbsd_core.attention import CrossAttention
from gbsd_core.prompts.chunks import (
    MAX_CONTEXT_CHUNKS,
    common_chunks,
    fit_conditionings,
    fit_context,
    make_chunks,
    name_lookup,
)
from gbsd_core.prompts.parser import Fragment, PromptError
from gbsd_core.sampling import Conditioning

COMMA = 267  # ",</w>" in CLIP's vocabulary
EMB = {"emb": ([40000, 40001], 3), "e2": ([40000], 5)}  # name -> (its token ids, vectors): "e2" a prefix of "emb"


def reference_chunks(stream: list, size: int = 75, backtrack: int = 20) -> list[list]:
    """The documented algorithm, written independently: items fill chunks of `size`; an item that finds its chunk
    full starts the next one, and unless that item is a comma, the items after the full chunk's last comma go with
    it when that comma is among the last `backtrack` positions (size - its index <= backtrack); an embedding's
    vectors go whole into one chunk; BREAK starts a new chunk. Items: (token, weight), ("vec", name, j, weight)."""
    chunks: list[list] = []
    current: list = []
    for entry in stream:
        if entry == "BREAK":
            chunks.append(current)
            current = []
            continue
        block = entry if isinstance(entry, list) else [entry]
        if len(current) == size:
            commas = [i for i, item in enumerate(current) if item[0] == COMMA]
            if block[0][0] != COMMA and commas and size - commas[-1] <= backtrack:
                chunks.append(current[:commas[-1] + 1])
                current = current[commas[-1] + 1:]
            else:
                chunks.append(current)
                current = []
        if len(current) + len(block) > size:
            chunks.append(current)
            current = []
        current = current + block
    if current or not chunks:
        chunks.append(current)
    return chunks


def random_stream(rng: random.Random) -> tuple[list[Fragment], dict[str, list[int]], list]:
    """Fragments with made-up texts, the ids each text "tokenizes" to, and the same content as a reference stream."""
    fragments, ids_of, stream = [], {}, []
    for k in range(rng.randint(1, 12)):
        if rng.random() < 0.1:
            fragments.append(Fragment("", is_break=True))
            stream.append("BREAK")
            continue
        w = rng.choice([1.0, 1.1, 0.9, 1.5])
        ids: list[int] = []
        for _ in range(rng.randint(0, 60)):
            r = rng.random()
            if r < 0.12:
                ids.append(COMMA)
                stream.append((COMMA, w))
            elif r < 0.16:
                name = rng.choice(list(EMB))
                ids += EMB[name][0]
                stream.append([(("vec", name, j), w) for j in range(EMB[name][1])])
            else:
                tok = rng.randint(300, 30000)
                ids.append(tok)
                stream.append((tok, w))
        text = f"t{k}"
        ids_of[text] = ids
        fragments.append(Fragment(text, w))
    return fragments, ids_of, stream


def chunked(fragments: list[Fragment], ids_of: dict[str, list[int]]) -> list[list]:
    lookup = name_lookup(list(EMB), lambda name: EMB[name][0])
    chunks = make_chunks(fragments, ids_of.__getitem__, COMMA, lookup, lambda name: EMB[name][1])
    return [[(("vec", *item) if isinstance(item, tuple) else item, w) for item, w in zip(c.items, c.weights)]
            for c in chunks]


@pytest.mark.parametrize("seed", range(300))
def test_chunks_follow_the_documented_rules(seed: int) -> None:
    fragments, ids_of, stream = random_stream(random.Random(seed))
    assert chunked(fragments, ids_of) == reference_chunks(stream)


def test_longest_embedding_name_first() -> None:
    # "emb" (ids 40000 40001) and "e2" (40000) share a first id: the longer name is matched where it fits
    got = chunked([Fragment("x")], {"x": [40000, 40001, 40000, 7]})
    assert [item for item, _ in got[0]] == [("vec", "emb", j) for j in range(3)] + [("vec", "e2", j) for j in
                                                                                    range(5)] + [7]


@pytest.mark.parametrize("n, counts", [(0, [0]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])])
def test_chunk_sizes(n: int, counts: list[int]) -> None:
    got = chunked([Fragment("x")], {"x": list(range(1000, 1000 + n))})
    assert [len(c) for c in got] == counts


@pytest.mark.parametrize("comma_at, first", [(60, 61), (55, 56), (54, 75), (74, 75)])
def test_comma_backtrack(comma_at: int, first: int) -> None:
    ids = list(range(1000, 1080))
    ids[comma_at] = COMMA  # 80 tokens, one comma: the first chunk ends after it if within the last 20 positions
    got = chunked([Fragment("x")], {"x": ids})
    assert [len(c) for c in got] == [first, 80 - first]


def test_a_comma_that_finds_the_chunk_full_starts_the_next() -> None:
    ids = list(range(1000, 1075)) + [COMMA, 5]
    assert [len(c) for c in chunked([Fragment("x")], {"x": ids})] == [75, 2]


# ------------------------------------------------------------------------------------ one length for a run


def test_common_chunks() -> None:
    assert common_chunks([1, 3, 1], "repeat") == 3 and common_chunks([2, 3], "repeat") == 6
    assert common_chunks([2, 3], "empty") == 3 and common_chunks([1], "repeat") == 1
    assert common_chunks([4, 4], "repeat") == 4
    with pytest.raises(PromptError, match=f"repeat to a common 20 chunks .* more than the {MAX_CONTEXT_CHUNKS}.*"
                                          "--chunk-padding empty"):
        common_chunks([4, 5], "repeat")
    assert common_chunks([4, 5], "empty") == 5


def test_fit_context() -> None:
    g = torch.Generator().manual_seed(0)
    c2 = torch.randn(1, 154, 8, generator=g)
    empty = torch.randn(1, 77, 8, generator=g)
    assert torch.equal(fit_context(c2, 6, "repeat", lambda: empty), torch.cat([c2, c2, c2], dim=1))
    assert torch.equal(fit_context(c2, 3, "empty", lambda: empty), torch.cat([c2, empty], dim=1))
    zeros = torch.zeros(1, 77, 8)  # SDXL's zeroed empty negative: zeros at any length
    assert torch.equal(fit_context(zeros, 3, "empty", lambda: empty), torch.zeros(1, 231, 8))
    assert fit_context(c2, 2, "repeat", lambda: empty) is c2


def test_fit_conditionings_keeps_pooled_and_one_chunk_runs() -> None:
    a = Conditioning(torch.ones(1, 77, 4), torch.ones(1, 3))
    b = Conditioning(torch.zeros(1, 154, 4) + 2, torch.ones(1, 3))
    one = fit_conditionings([a, a], "repeat", lambda: torch.zeros(1, 77, 4))
    assert one[0] is a and one[1] is a  # nothing to fit: the very objects (no existing run changes)
    fa, fb = fit_conditionings([a, b], "repeat", lambda: torch.zeros(1, 77, 4))
    assert fa.context.shape == (1, 154, 4) and fb is b and fa.pooled is a.pooled


def test_attention_over_a_repeated_context_is_attention_over_the_context() -> None:
    """Why "repeat" is A1111's separate calls: softmax over r copies of each key splits each weight in r equal parts
    and the values add back up. The core's cross-attention on a context repeated 3x equals it on the context."""
    g = torch.Generator().manual_seed(1)
    attn = CrossAttention(64, 32, heads=4, dim_head=16)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        x, ctx = torch.randn(2, 50, 64, generator=g), torch.randn(2, 77, 32, generator=g)
        once, thrice = attn(x, ctx), attn(x, ctx.repeat(1, 3, 1))
    assert (once - thrice).abs().max() < 1e-5
    assert (attn(x, torch.cat([ctx, torch.zeros(2, 77, 32)], dim=1)) - once).abs().max() > 1e-3  # padding is not
