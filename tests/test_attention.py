"""The plain attention of the UNet (gbsd_core/attention.py) against softmax(Q Kᵀ / √d) V written out in float64 here,
self- and cross-attention, the fp32 upcast, and SpatialTransformer keeping its input's memory layout."""
from __future__ import annotations

import torch

from _util import rel_err
from gbsd_core.attention import CrossAttention, SpatialTransformer


def _attention(query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False):
    torch.manual_seed(0)
    attn = CrossAttention(query_dim, context_dim, heads, dim_head, upcast).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return attn


def _reference(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Multi-head attention by hand in float64, heads split as the reference's 'b n (h d) -> (b h) n d'."""
    h, d = attn.heads, attn.dim_head

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, h*d] -> [B, h, N, d]
        return t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3)

    w = {name: p.double() for name, p in attn.named_parameters()}
    q = heads(x.double() @ w["to_q.weight"].T)
    k = heads(context.double() @ w["to_k.weight"].T)
    v = heads(context.double() @ w["to_v.weight"].T)
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * d)
    return out @ w["to_out.0.weight"].T + w["to_out.0.bias"]


def test_cross_attention_equals_the_written_out_formula():
    attn = _attention(40, 24, heads=4, dim_head=8)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 33, 40, generator=g), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        err = rel_err(attn(x, context), _reference(attn, x, context))
    print(f"cross-attention vs float64 formula: {err:.2e}")
    assert err <= 1e-6


def test_self_attention_attends_over_its_input():
    attn = _attention(32, None, heads=2, dim_head=16)
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(attn(x), _reference(attn, x, x)) <= 1e-6


def test_upcast_hands_the_attention_kernel_fp32_and_returns_the_input_dtype(monkeypatch):
    import gbsd_core.attention as attention

    seen = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    x, context = torch.randn(1, 16, 64), torch.randn(1, 5, 64)
    exact = _reference(_attention(64, 64, 1, 64), x, context)
    for upcast, kernel_dtype in ((False, torch.bfloat16), (True, torch.float32)):
        attn = _attention(64, 64, heads=1, dim_head=64, upcast=upcast).bfloat16()
        with torch.no_grad():
            out = attn(x.bfloat16(), context.bfloat16())
        assert seen.pop() == (kernel_dtype,) * 3 and out.dtype == torch.bfloat16
        assert rel_err(out, exact) <= 3e-2  # bf16 projections either way


def test_spatial_transformer_returns_its_inputs_memory_layout():
    torch.manual_seed(3)
    for use_linear in (False, True):
        st = SpatialTransformer(64, heads=2, dim_head=32, depth=1, context_dim=16, use_linear=use_linear).eval()
        context = torch.randn(2, 7, 16)
        x = torch.randn(2, 64, 6, 5)
        with torch.no_grad():
            plain = st(x, context)
            last = st(x.contiguous(memory_format=torch.channels_last), context)
        assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)
        assert last.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(last, plain) <= 1e-6
