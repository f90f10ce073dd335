"""Helpers of the text-encoder tests (test_clip_text.py, test_openclip_text.py)."""
from __future__ import annotations

import re

import torch
from _util import LDM_KEYS, read_keys_tsv

from gbsd_core.clip_text import CLIPTextConfig
from gbsd_core.openclip_text import OpenCLIPTextConfig

TOL = 1e-5

BOS, EOS = 49406, 49407

TINY_SD1 = CLIPTextConfig(vocab_size=49408, width=32, layers=3, heads=4, context_length=77)

TINY_SD2 = OpenCLIPTextConfig(vocab_size=49408, width=32, layers=3, heads=4, context_length=77, embed_dim=24)


# ----------------------------------------------------------------------------------------------------- helpers
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (random biases and LayerNorm affines too, so a swapped or dropped
    bias cannot hide behind a zero init). Scales keep each residual branch O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 0:
                continue  # logit_scale: unused by SD
            if name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim == 1:  # LayerNorm weight
                p.copy_(1 + 0.1 * r)
            elif "embedding" in name:  # token / position embeddings
                p.copy_(r)
            else:  # Linear-like [out, in] (and text_projection [in, out]: scale only matters loosely)
                p.copy_(r / p.shape[1] ** 0.5)


def sd_tokens(pad: int, lengths: tuple[int, ...] = (3, 17, 75), seed: int = 0) -> torch.Tensor:
    """Real-looking prompts: BOS, n word ids, EOS, then padding (SD1 pads with EOS, SD2 with 0) to 77."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(256, BOS, (n,), generator=g)
        row = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS])])
        rows.append(torch.cat([row, torch.full((77 - len(row),), pad)]))
    return torch.stack(rows)


def golden_keys(tsv: str) -> dict[str, tuple[int, ...]]:
    """Required `cond_stage_model.*` keys of a golden list, prefix stripped -> shape."""
    rows = read_keys_tsv(LDM_KEYS / tsv)
    p = "cond_stage_model."
    return {k[len(p):]: shape for k, (shape, _, opt) in rows.items() if k.startswith(p) and opt is None}


def key_pattern(keys) -> set[str]:
    return {re.sub(r"\.(layers|resblocks)\.\d+\.", r".\1.N.", k) for k in keys}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}
