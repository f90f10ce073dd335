"""CLIP BPE tokenizer for SD prompts: open_clip's `SimpleTokenizer` (it ships the BPE vocab, so it works offline),
framed and padded the way each SD family's text encoder expects.

Layout of one row (context length 77):
    [<start_of_text> = 49406] + up to 75 BPE ids + [<end_of_text> = 49407] + padding
SD1 (ldm FrozenCLIPEmbedder, transformers CLIPTokenizer with padding="max_length") pads with 49407; SD2 (ldm
FrozenOpenCLIPEmbedder, `open_clip.tokenize`) pads with 0; SDXL base's two towers one each. Both cut long prompts
to start + 75 + end; we also warn and name the words that were dropped, since a silently truncated prompt is a
common source of confusion.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the import itself costs ~7 s (open_clip pulls in its model zoo), so only on first use
    from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
CONTEXT_LENGTH = 77


class Tokenizer:
    """`Tokenizer(pad_token_id)(prompts) -> LongTensor [B, 77]`; pad_token_id is 49407 for SD1, 0 for SD2."""

    context_length: int = CONTEXT_LENGTH

    def __init__(self, pad_token_id: int) -> None:
        if not 0 <= pad_token_id <= EOT_TOKEN_ID:
            raise ValueError(f"pad_token_id must be a CLIP token id in [0, {EOT_TOKEN_ID}], got {pad_token_id}")
        self.pad_token_id = pad_token_id
        self._bpe: SimpleTokenizer | None = None

    @property
    def bpe(self) -> SimpleTokenizer:
        """open_clip's BPE tokenizer, built on first use (lowercases and runs ftfy/html cleanup, like OpenAI CLIP)."""
        if self._bpe is None:
            from open_clip.tokenizer import SimpleTokenizer

            bpe = SimpleTokenizer()
            if (bpe.sot_token_id, bpe.eot_token_id) != (SOT_TOKEN_ID, EOT_TOKEN_ID):
                raise RuntimeError(
                    f"open_clip's vocab has start/end ids {bpe.sot_token_id}/{bpe.eot_token_id}, "
                    f"expected {SOT_TOKEN_ID}/{EOT_TOKEN_ID}"
                )
            self._bpe = bpe
        return self._bpe

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens and without truncation."""
        return self.bpe.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        """Text of BPE ids (start/end/padding ids are skipped)."""
        ids = [i for i in ids if i not in (SOT_TOKEN_ID, EOT_TOKEN_ID)]
        return self.bpe.decode(ids).strip()

    def __call__(self, prompts: str | list[str], pad_token_id: int | None = None) -> torch.Tensor:
        """Token ids, LongTensor [B, 77]; a single string gives B = 1. Over-long prompts are cut with a warning.

        `pad_token_id` overrides this tokenizer's padding (SDXL base tokenizes each prompt for two towers that pad
        differently)."""
        pad_token_id = self.pad_token_id if pad_token_id is None else pad_token_id
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        keep = self.context_length - 2  # room for start and end tokens: 75
        out = torch.full((len(prompts), self.context_length), pad_token_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > keep:
                dropped = self.bpe.decode(ids[keep:]).strip()
                warnings.warn(
                    f"prompt {i} has {len(ids)} tokens, more than the {keep} CLIP can take; dropped: {dropped!r}",
                    stacklevel=2,
                )
                ids = ids[:keep]
            row = [SOT_TOKEN_ID, *ids, EOT_TOKEN_ID]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(pad_token_id={self.pad_token_id})"
