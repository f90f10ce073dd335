"""Prompts past 75 tokens: chunks of 75, each its own 77-token row; and one length for every prompt of a run.

A1111 (modules/sd_hijack_clip.py, `tokenize_line`) reads a prompt of any length, and so does gbsd:

- The weighted fragments (parser.py) are tokenized one by one and laid out in chunks of 75 positions. A position holds
  a BPE token, or one vector of a textual-inversion embedding that the tokens name (embeddings.py): a name is found by
  its own token ids, the longest name first, and its n vectors never straddle two chunks (the chunk is closed first).
- When a chunk is full and the token that does not fit is not a comma, the words after the chunk's last comma move to
  the next chunk, if that comma is among the last COMMA_BACKTRACK positions (A1111's "comma padding backtrack", 20).
- BREAK closes the chunk where it stands; a chunk is never empty unless the prompt is (or two BREAKs touch).
- Each chunk becomes a row [start, 75 positions, end] padded to 77 (encode.py), encoded alone; the rows' hidden
  states are joined along the sequence axis: a prompt of k chunks is a context [1, 77·k, D].

Where gbsd differs: when the comma rule moves an embedding's vectors, they move with their positions (A1111 leaves
its record of them behind, so the vectors land on the old chunk's padding).

Then the prompts of one run -- the negative, the global and every local prompt -- must have one length: classifier-free
guidance runs [negative; prompt] as one batch, and GBSD mixes E(global) and E(local) position by position. Two ways
(`GenerationParams.chunk_padding`; README, Prompts):

- "repeat" (default): each context is repeated whole to the least common multiple of the chunk counts. Attention over a
  context repeated r times is attention over the context itself (every key and value appears r times: the softmax
  weights are each divided by r and summed r times), so this is exactly A1111's default -- the prompt and the negative
  prompt in separate UNet calls of their own lengths -- in one batched call of static shape (ComfyUI batches unequal
  conditionings the same way). GBSD's mix of a 3-chunk global prompt with a 1-chunk local one is then the mix of
  E(global) with E(local) three times, so α = 0 is still exactly the local prompt alone.
- "empty": the shorter are padded with the empty prompt's chunk to the longest (A1111's "Pad prompt/negative prompt"
  option, written `Pad conds: True`): fewer positions when counts share no factor, a different image when they differ.
  A zeroed negative (SDXL's empty negative prompt) is padded with zeros.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..sampling import Conditioning
from ..tokenizer import CONTEXT_LENGTH
from .parser import Fragment, PromptError

CHUNK_TOKENS = CONTEXT_LENGTH - 2  # 75 positions between the start and the end token
COMMA_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default
MAX_PROMPT_CHUNKS = 8  # 600 tokens, ~2,400 characters of English: past it a prompt is refused
MAX_CONTEXT_CHUNKS = 16  # the longest run context "repeat" may make (the LCM of the counts): 1,232 positions
PADDINGS = ("repeat", "empty")

Item = int | tuple[str, int]  # a BPE token id, or (embedding name, which of its vectors)


@dataclass
class Chunk:
    """Up to 75 positions of a prompt and their weights (start, end and padding are added when encoded)."""

    items: list[Item] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


NameLookup = dict[int, list[tuple[list[int], str]]]  # first token id -> [(a name's token ids, name)], longest first


def name_lookup(names: Sequence[str], encode: Callable[[str], list[int]]) -> NameLookup:
    """Embedding names by their token ids, as A1111 finds them in a prompt (EmbeddingDatabase.ids_lookup)."""
    lookup: NameLookup = {}
    for name in names:
        ids = encode(name)
        if ids:
            lookup.setdefault(ids[0], []).append((ids, name))
    for entries in lookup.values():
        entries.sort(key=lambda e: -len(e[0]))
    return lookup


def _match(lookup: NameLookup, ids: list[int], pos: int) -> tuple[str, int] | None:
    for name_ids, name in lookup.get(ids[pos], ()):
        if ids[pos:pos + len(name_ids)] == name_ids:
            return name, len(name_ids)
    return None


def make_chunks(fragments: Sequence[Fragment], encode: Callable[[str], list[int]], comma_id: int,
                lookup: NameLookup, vectors: Callable[[str], int]) -> list[Chunk]:
    """Weighted fragments -> chunks of at most 75 positions (module docstring). `encode`: text -> BPE ids;
    `vectors(name)`: how many positions the embedding `name` takes."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1  # position of the current chunk's last comma, -1 for none

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for fragment in fragments:
        if fragment.is_break:
            close()
            continue
        ids, w, pos = encode(fragment.text), fragment.weight, 0
        while pos < len(ids):
            if ids[pos] == comma_id:
                last_comma = len(chunk.items)
            elif len(chunk.items) == CHUNK_TOKENS and last_comma != -1 \
                    and len(chunk.items) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the comma start the next chunk
                moved = Chunk(chunk.items[cut:], chunk.weights[cut:])
                del chunk.items[cut:], chunk.weights[cut:]
                close()
                chunk = moved
            if len(chunk.items) == CHUNK_TOKENS:
                close()
            found = _match(lookup, ids, pos)
            if found is None:
                chunk.items.append(ids[pos])
                chunk.weights.append(w)
                pos += 1
                continue
            name, n_ids = found
            n = vectors(name)
            if len(chunk.items) + n > CHUNK_TOKENS:
                close()
            chunk.items += [(name, j) for j in range(n)]
            chunk.weights += [w] * n
            pos += n_ids
    if chunk.items or not chunks:
        close()
    return chunks


def check_chunk_count(chunks: int, where: str) -> None:
    if chunks > MAX_PROMPT_CHUNKS:
        raise PromptError(f"{where} is {chunks} chunks of 75 tokens; gbsd reads at most {MAX_PROMPT_CHUNKS} "
                          f"({MAX_PROMPT_CHUNKS * CHUNK_TOKENS} tokens)")


def common_chunks(counts: Sequence[int], padding: str) -> int:
    """The chunk count every context of a run is brought to: the LCM of `counts` ("repeat") or the largest ("empty").
    PromptError when "repeat" would need more than MAX_CONTEXT_CHUNKS."""
    if padding == "empty":
        return max(counts)
    n = math.lcm(*counts)
    if n > MAX_CONTEXT_CHUNKS:
        raise PromptError(f"prompts of {', '.join(str(c) for c in sorted(set(counts)))} chunks repeat to a common "
                          f"{n} chunks ({n * CONTEXT_LENGTH} positions), more than the {MAX_CONTEXT_CHUNKS} gbsd "
                          "runs; shorten a prompt, or pad with the empty prompt (--chunk-padding empty)")
    return n


def fit_context(context: Tensor, chunks: int, padding: str, empty: Callable[[], Tensor]) -> Tensor:
    """[B, 77·k, D] -> [B, 77·chunks, D]: repeated whole, or padded with `empty()` [1, 77, D] (zeros for a zero
    context). `chunks` is a multiple of k for "repeat", at least k for "empty"."""
    k = context.shape[1] // CONTEXT_LENGTH
    if k == chunks:
        return context
    if padding == "repeat":
        return context.repeat(1, chunks // k, 1)
    pad = torch.zeros_like(context[:, :CONTEXT_LENGTH]) if not context.any() else empty().to(context)
    return torch.cat([context, pad.expand(context.shape[0], -1, -1).repeat(1, chunks - k, 1)], dim=1)


def fit_conditionings(conds: Sequence[Conditioning], padding: str,
                      empty: Callable[[], Tensor]) -> list[Conditioning]:
    """Every conditioning of a run brought to one context length (module docstring); pooled and size embeddings
    unchanged (SDXL pools each prompt's first chunk). Conditionings of one chunk each come back as they are."""
    if padding not in PADDINGS:
        raise ValueError(f"chunk padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    counts = [c.context.shape[1] // CONTEXT_LENGTH for c in conds]
    n = common_chunks(counts, padding)
    return [c if k == n else c._replace(context=fit_context(c.context, n, padding, empty))
            for c, k in zip(conds, counts)]
