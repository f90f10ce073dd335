"""A prompt as A1111 writes it -> the text encoder's conditioning: chunks encoded one by one, embeddings spliced in,
weights applied, the chunks joined.

Per chunk (chunks.py makes them) and per text tower: the row [start, 75 positions, end, padding] of token ids, where a
textual-inversion vector's position holds id 0 (as in A1111: the id only has to be a valid one; its token embedding
is replaced) and the tower's padding id follows the end token (SD1's CLIP-L 49407, OpenCLIP 0). The embedding's
vectors replace the token embeddings at their positions through a forward hook on the tower's `token_embedding`,
before the position embeddings are added: the seam A1111 uses (sd_hijack's EmbeddingsWithFixes) and the one
diffusers' `load_textual_inversion` reaches by adding vocabulary rows. The towers then run exactly as for a plain
prompt (`SDBundle.encode_prompt`'s calls): so a prompt with no syntax and at most 75 tokens gives the same bits.

Weights ("emphasis", A1111's modules/sd_emphasis.py), on each chunk's output z [1, 77, D] per tower, w per position
(1 for start, end and padding):

    original   z·w, then rescaled so its mean is the mean of z: z' = z·w · mean(z) / mean(z·w)   (A1111's default)
    no_norm    z·w                                                                             (A1111 "No norm")
    ignore     z: the syntax is read (brackets removed, BREAK obeyed) but weights are not applied (A1111 "Ignore")
    none       no syntax at all: brackets and BREAK are text                                   (A1111 "None")

A1111 takes each mean over the batch it encodes; gbsd encodes every prompt alone, as A1111 does at batch size 1.
SDXL's two towers are weighted each on its own output (A1111 wraps each tower alone), and the pooled vector is the
first chunk's, unweighted (A1111 `zs[0].pooled`; diffusers, which reads 77 tokens, pools the same first row).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..clip_text import CLIPTextConfig, CLIPTextEncoder
from ..openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from ..sampling import Conditioning
from ..sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig
from ..tokenizer import CONTEXT_LENGTH, EOT_TOKEN_ID, SOT_TOKEN_ID, Tokenizer
from .chunks import Chunk, check_chunk_count, common_chunks, make_chunks
from .embeddings import SINGLE, EmbeddingLibrary, Tower, fit
from .parser import ExtraNetwork, PromptError, check_lora_tags_taken_out, read_syntax
from .schedule import prompt_schedule

PLACEHOLDER_ID = 0  # the token id under an embedding's vector (any valid id: its embedding is replaced)

TextEncoder = CLIPTextEncoder | OpenCLIPTextEncoder | SDXLConditioner
TextConfig = CLIPTextConfig | OpenCLIPTextConfig | SDXLConditionerConfig


@dataclass(frozen=True)
class ReadPrompt:
    """A prompt read: its chunks (positions and weights) and the extra-network tags taken out of it."""

    chunks: list[Chunk]
    tags: list[ExtraNetwork]

    def embedding_names(self) -> list[str]:
        """The embeddings it names, in order of first use."""
        names = [item[0] for chunk in self.chunks for item in chunk.items if isinstance(item, tuple)]
        return list(dict.fromkeys(names))

    def word_positions(self) -> list[int]:
        """Context positions of its words (tokens and embedding vectors), in its own [1, 77·k] context."""
        return [c * CONTEXT_LENGTH + 1 + j for c, chunk in enumerate(self.chunks) for j in range(len(chunk.items))]


def text_towers(config: TextConfig) -> list[Tower]:
    """The text towers an embedding must fit, in the conditioner's order (SDXL: CLIP-L then bigG; refiner: bigG)."""
    if isinstance(config, SDXLConditionerConfig):
        clip = [] if config.clip is None else [Tower("clip_l", config.clip.width)]
        return [*clip, Tower("clip_g", config.openclip.width)]
    return [Tower(SINGLE, config.width)]


def read_prompt(prompt: str, tokenizer: Tokenizer, emphasis: str = "original",
                library: EmbeddingLibrary | None = None, towers: Sequence[Tower] = (), family: str = "",
                where: str = "prompt") -> ReadPrompt:
    """Parse (parser.py) and lay out in chunks (chunks.py). With `towers`, every embedding named is checked to fit
    them. Raises PromptError naming `where` and the problem. Needs no weights: the BPE tables only."""
    fragments, tags = read_syntax(prompt, emphasis, where)
    lookup = library.lookup(tokenizer.encode) if library is not None else {}
    chunks = make_chunks(fragments, tokenizer.encode, tokenizer.bpe.encoder[",</w>"], lookup,
                         lambda name: library.get(name).length)
    check_chunk_count(len(chunks), where)
    read = ReadPrompt(chunks, tags)
    for name in read.embedding_names() if towers else ():
        fit(library.get(name), towers, family)
    return read


def check_run(prompts: Sequence[tuple[str, str]], steps: int, emphasis: str, padding: str, tokenizer: Tokenizer,
              library: EmbeddingLibrary | None, towers: Sequence[Tower], family: str) -> list[str]:
    """Everything about a run's prompts that can be known without weights (the CLI asks before loading any): each
    (where, prompt) read in every text its schedule holds for `steps` steps, within the chunk limit, its embeddings
    fitting the towers; the run's contexts brought to one length (chunks.common_chunks). PromptError names the
    problem. Returns the names of the embeddings the prompts use."""
    counts, names = [], []
    for where, prompt in prompts:
        for text in dict.fromkeys(text for _, text in prompt_schedule(prompt, steps, where)):
            read = read_prompt(text, tokenizer, emphasis, library, towers, family, where)
            counts.append(len(read.chunks))
            names += read.embedding_names()
    common_chunks(counts, padding)
    return list(dict.fromkeys(names))


@torch.no_grad()
def encode(text_encoder: TextEncoder, tokenizer: Tokenizer, prompt: str, emphasis: str = "original",
           library: EmbeddingLibrary | None = None, family: str = "") -> Conditioning:
    """One prompt -> Conditioning(context [1, 77·k, D], pooled [1, P] for SDXL, else None), in the encoder's dtype.
    A prompt still holding a LoRA tag is refused (PromptError): the LoRA code takes the tags out and applies them."""
    check_lora_tags_taken_out(prompt)
    read = read_prompt(prompt, tokenizer, emphasis, library, text_towers(text_encoder.config), family)
    device = next(text_encoder.parameters()).device
    parts = [_encode_chunk(text_encoder, tokenizer, chunk, library, emphasis, device) for chunk in read.chunks]
    context = parts[0][0] if len(parts) == 1 else torch.cat([c for c, _ in parts], dim=1)
    return Conditioning(context, parts[0][1])


def _towers(text_encoder: TextEncoder) -> list[CLIPTextEncoder | OpenCLIPTextEncoder]:
    return list(text_encoder.embedders) if isinstance(text_encoder, SDXLConditioner) else [text_encoder]


def _token_embedding(tower: CLIPTextEncoder | OpenCLIPTextEncoder) -> nn.Embedding:
    if isinstance(tower, CLIPTextEncoder):
        return tower.transformer.text_model.embeddings.token_embedding
    return tower.model.token_embedding


def _row(chunk: Chunk, pad: int) -> list[int]:
    """[start, the chunk's positions, end, padding] as token ids, 77 long."""
    ids = [PLACEHOLDER_ID if isinstance(item, tuple) else item for item in chunk.items]
    return [SOT_TOKEN_ID, *ids, EOT_TOKEN_ID] + [pad] * (CONTEXT_LENGTH - 2 - len(ids))


@contextlib.contextmanager
def _spliced(modules: Sequence[nn.Embedding], positions: list[int], vectors: Sequence[Tensor]) -> Iterator[None]:
    """While open, each token-embedding module's output has `vectors[i]` [n, D] at `positions` (row 0)."""
    def hook(vec: Tensor):
        def replace(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            out = out.clone()
            out[0, positions] = vec.to(out.device, out.dtype)
            return out
        return replace

    handles = [m.register_forward_hook(hook(v)) for m, v in zip(modules, vectors)] if positions else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _encode_chunk(text_encoder: TextEncoder, tokenizer: Tokenizer, chunk: Chunk, library: EmbeddingLibrary | None,
                  emphasis: str, device: torch.device) -> tuple[Tensor, Tensor | None]:
    towers = _towers(text_encoder)
    keys = [t.key for t in text_towers(text_encoder.config)]
    # the padding the plain path uses (SDBundle.encode_prompt): the tokenizer's, SDXL's per tower
    pads = text_encoder.pad_token_ids if isinstance(text_encoder, SDXLConditioner) else (tokenizer.pad_token_id,)
    rows = [torch.tensor([_row(chunk, pad)], dtype=torch.long, device=device) for pad in pads]  # [1, 77] each
    spots = [(i + 1, item) for i, item in enumerate(chunk.items) if isinstance(item, tuple)]
    vectors = [torch.stack([library.get(name).vectors[key][j] for _, (name, j) in spots]) for key in keys] \
        if spots else []
    with _spliced([_token_embedding(t) for t in towers], [p for p, _ in spots], vectors):
        if isinstance(text_encoder, SDXLConditioner):
            context, pooled = text_encoder(rows)
        else:
            context, pooled = text_encoder(rows[0]), None
    weights = [1.0, *chunk.weights] + [1.0] * (CONTEXT_LENGTH - 1 - len(chunk.weights))
    if emphasis in ("original", "no_norm") and any(w != 1.0 for w in weights):
        widths = [t.config.width for t in towers]  # each tower's slice weighted alone (A1111 wraps each tower)
        context = torch.cat([weigh(z, weights, emphasis) for z in context.split(widths, dim=-1)], dim=-1)
    return context, pooled


def weigh(z: Tensor, weights: Sequence[float], emphasis: str = "original") -> Tensor:
    """A1111's emphasis on one chunk's output z [1, 77, D]: z·w per position, and for "original" rescaled to z's mean
    (module docstring). PromptError when the weights cancel the mean (only negative weights can)."""
    w = torch.tensor(weights, dtype=torch.float32).to(z.device, z.dtype)[None, :, None]
    if emphasis == "no_norm":
        return z * w
    mean = z.mean()
    weighted = z * w
    out = weighted * (mean / weighted.mean())
    if not bool(torch.isfinite(out).all()):
        raise PromptError("the prompt's weights cancel a chunk's mean (negative weights?): A1111's mean restoration "
                          "divides by it; change the weights or use --emphasis no_norm")
    return out
