"""FastCrossAttention (gbsd_core/fast/attention.py): fused QKV, the per-stage cross-attention K/V cache and the
explicit softmax, each exact against the plain attention in fp32."""
from __future__ import annotations

import pytest
import torch
from _fast import fast_unet, tiny_unet
from _util import rel_err

from gbsd_core.attention_sites import attention_sites
from gbsd_core.fast.attention import FastCrossAttention, set_context_kv


# ----------------------------------------------------------------------------------------------------- fused QKV
def test_fused_qkv_is_exact_keeps_keys_and_shares_memory():
    unet, fused = tiny_unet(), fast_unet()
    for site in attention_sites(fused, cross=False):
        site.module.fuse_qkv()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 48)
    with torch.no_grad():
        err = rel_err(fused(x, t, c), unet(x, t, c))
    print(f"fused QKV vs unfused: rel err {err:.2e}")
    assert err <= 1e-5
    sd, sd_fused = unet.state_dict(), fused.state_dict()
    assert list(sd) == list(sd_fused) and all(torch.equal(sd[k], sd_fused[k]) for k in sd)
    attn = next(attention_sites(fused, cross=False)).module
    assert attn.qkv_weight is not None
    for lin in (attn.to_q, attn.to_k, attn.to_v):  # views into the stacked weight: no extra memory
        assert lin.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
    # Loading other weights (in place, through the views) must reach the fused matmul too.
    other = tiny_unet(seed=1)
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        err = rel_err(fused(x, t, c), other(x, t, c))
    print(f"fused QKV after load_state_dict: rel err {err:.2e}")
    assert err <= 1e-5
    with pytest.raises(ValueError, match="self-attention"):
        next(attention_sites(fused)).module.fuse_qkv()


# ----------------------------------------------------------------------------------------------------- K/V cache
def test_context_kv_cache_is_exact_refuses_other_contexts_and_updates_in_place():
    unet = fast_unet()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    c1, c2 = torch.randn(2, 77, 48), torch.randn(2, 77, 48)
    with torch.no_grad():
        ref1, ref2 = unet(x, t, c1), unet(x, t, c2)
        set_context_kv(unet, c1)
        err1 = rel_err(unet(x, t, c1), ref1)
        with pytest.raises(RuntimeError, match="cached for another context"):
            unet(x, t, c2)
        site = next(attention_sites(unet)).module
        k_before = site.context_kv[1].data_ptr()
        set_context_kv(unet, c2)  # same shapes: written in place (what a captured CUDA graph relies on)
        assert site.context_kv[1].data_ptr() == k_before
        err2 = rel_err(unet(x, t, c2), ref2)
        set_context_kv(unet, None)
        assert torch.equal(unet(x, t, c1), ref1)
    print(f"K/V cache vs recomputed: rel err {err1:.2e}, after in-place update {err2:.2e}")
    assert err1 <= 1e-5 and err2 <= 1e-5
    with pytest.raises(ValueError, match="dtype"):
        set_context_kv(unet, c1.double())


# ----------------------------------------------------------------------------------------------------- attention
def test_attention_backends_match_sdpa():
    unet = fast_unet()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 48)
    with torch.no_grad():
        ref = unet(x, t, c)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # PyTorch has a CPU flash kernel too
            err_flash = rel_err(unet(x, t, c), ref)
        for m in unet.modules():
            if isinstance(m, FastCrossAttention):
                m.explicit_softmax = True
        err_math = rel_err(unet(x, t, c), ref)
    print(f"attention vs SDPA auto: explicit softmax {err_math:.2e}, flash {err_flash:.2e}")
    assert err_math <= 1e-5 and err_flash <= 1e-5


# ----------------------------------------------------------------------------------------------------- upcast
def _sdpa_dtypes(monkeypatch) -> list[torch.dtype]:
    """Record the q/k/v dtype of every scaled_dot_product_attention call (core and fast attention both look it up on
    torch.nn.functional at call time)."""
    import torch.nn.functional as F

    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_sd2_v_fp16_with_flash_hands_sdpa_half_qkv(monkeypatch):
    """Issue items 3 and 7: an fp16 v-model (SD2-768-v) gets attention upcasting; with attention="flash" the fp32
    upcast handed SDPA fp32 q/k/v, for which CUDA's flash kernel has no implementation (a hard error on the GPU).
    Flash and memory-efficient attention accumulate q·kᵀ and the softmax in fp32 already: q/k/v must stay fp16."""
    from _fast import tiny_bundle
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gbsd_core.fast import FastOptions, accelerate

    b = tiny_bundle("v_prediction")
    accelerate(b, FastOptions(dtype=torch.float16, attention="flash", cpu_prepack=False))
    attns = [m for m in b.unet.modules() if isinstance(m, FastCrossAttention)]
    assert attns and all(a.upcast for a in attns)  # the v-model's upcast is on
    seen = _sdpa_dtypes(monkeypatch)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 48)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # CPU has a flash kernel, fp16 included
        out = b.unet(x.half(), t, c.half())
    assert torch.isfinite(out).all()
    assert seen and all(d == (torch.float16,) * 3 for d in seen), set(seen)


def test_upcast_only_on_the_explicit_softmax_path(monkeypatch):
    """Logits past fp16's 65504: SDPA (flash and PyTorch's math kernel both accumulate in fp32) stays finite and
    accurate on fp16 q/k/v; the explicit softmax(QKᵀ)V needs the upcast, keeps it, and overflows without it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    attn = FastCrossAttention(64, 32, heads=1, dim_head=64, upcast=True)
    with torch.no_grad():
        attn.to_q.weight.mul_(100.0), attn.to_k.weight.mul_(100.0)
    x, ctx = torch.randn(1, 64, 64), torch.randn(1, 77, 32)
    with torch.no_grad():
        ref = attn.double()(x.double(), ctx.double())
        half = attn.half()
        q = half.to_q(x.half())
        assert (q.float() @ half.to_k(ctx.half()).float().transpose(1, 2)).abs().max() > 65504  # the logits do overflow fp16
        seen = _sdpa_dtypes(monkeypatch)
        errs = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            with sdpa_kernel(backend):
                errs[backend.name] = rel_err(half(x.half(), ctx.half()), ref)
        assert all(d == (torch.float16,) * 3 for d in seen)
        half.explicit_softmax = True
        errs["explicit, upcast"] = rel_err(half(x.half(), ctx.half()), ref)
        half.upcast = False
        overflowed = not torch.isfinite(half(x.half(), ctx.half())).all()
    print(f"fp16 attention with logits > 65504, rel err vs fp64: {errs}; explicit without upcast overflows: "
          f"{overflowed}")
    assert overflowed and all(e <= 5e-3 for e in errs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("attention", ["flash", "efficient", "sdpa"])
def test_cuda_sd2_v_fp16_forced_backends_run(attention):
    """Issue item 3 on the GPU itself: an fp16 v-model with a forced backend steps without 'No available kernel'."""
    from _fast import tiny_bundle

    from gbsd_core.fast import FastOptions, make_stepper

    b, plain = tiny_bundle("v_prediction"), tiny_bundle("v_prediction")
    b.unet.cuda(), b.vae.cuda()
    ctx, x = torch.randn(2, 77, 48), torch.randn(1, 4, 8, 8)
    with make_stepper(b, FastOptions(dtype=torch.float16, attention=attention), 7.5) as step:
        t = int(step.sampler.timesteps(10)[2])
        step.set_context(ctx.cuda())
        ours = step(x.cuda(), t, None)[0].cpu()
    from gbsd_core.sampling import CFGStep

    ref = CFGStep(plain.unet, step.sampler, 7.5)
    ref.set_context(ctx)
    with torch.no_grad():
        err = rel_err(ours, ref(x, t, None)[0])
    print(f"cuda fp16 v-model, attention={attention}: rel err vs fp32 CPU {err:.2e}")
    assert torch.isfinite(ours).all() and err <= 2e-2
