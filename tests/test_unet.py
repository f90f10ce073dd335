"""Tiny-config UNet tests: key layout, config inference, shapes at odd sizes, the attention-probability hook, and
numerical parity with diffusers' UNet2DConditionModel (the reference, test-only) on the same weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _reference import diffusers_unet
from _util import LDM_KEYS, read_keys_tsv, rel_err
from gbsd_core.unet import UNetConfig, UNetModel, query_hw
from gbsd_core.unet_blocks import timestep_embedding

PREFIX = "model.diffusion_model."

# SD1-like: conv proj, fixed head count, a level without attention (ds 4), one ResBlock per level.
TINY_CONV = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                       num_heads=2, context_dim=16)
# SD2-like: linear proj, fixed head width, depth-2 transformers, attention only at full resolution.
TINY_LINEAR = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1,),
                         num_heads=-1, num_head_channels=16, context_dim=24, use_linear_in_transformer=True,
                         transformer_depth=2)
TINY = {"conv": TINY_CONV, "linear": TINY_LINEAR}


def _model(cfg: UNetConfig, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return UNetModel(cfg).eval()


def _inputs(cfg: UNetConfig, h: int, w: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([981, 1][:batch] + [500] * max(0, batch - 2))
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("fixture,cfg", [("sd1_v1-inference.tsv", UNetConfig.sd1()),
                                         ("sd2_v2-inference.tsv", UNetConfig.sd2())])
def test_keys_match_original_checkpoint(fixture, cfg):
    golden = {k[len(PREFIX):]: v[0] for k, v in read_keys_tsv(LDM_KEYS / fixture).items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    assert sorted(set(ours) ^ set(golden)) == []
    assert {k: s for k, s in ours.items() if s != golden[k]} == {}
    # Config inference from the original key names/shapes alone gives back the YAML config.
    assert UNetConfig.from_state_dict({k: torch.empty(s, device="meta") for k, s in golden.items()}) == cfg


@pytest.mark.parametrize("name", TINY)
def test_config_round_trip(name):
    cfg = TINY[name]
    inferred = UNetConfig.from_state_dict(_model(cfg).state_dict())
    # The head split is not recorded in any shape (documented heuristic); everything else must round-trip.
    assert dataclasses.replace(inferred, num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels) == cfg
    assert (inferred.num_heads, inferred.num_head_channels) == (-1, 64)  # context_dim != 768 -> SD2 rule


def test_config_round_trip_exact_with_sd1_heads():
    cfg = dataclasses.replace(TINY_CONV, num_heads=8, context_dim=768)
    assert UNetConfig.from_state_dict(_model(cfg).state_dict()) == cfg


def test_config_accepts_lists():
    cfg = UNetConfig(channel_mult=[1, 2, 4, 4], attention_resolutions=[1, 2, 4])
    assert cfg == UNetConfig.sd1() and hash(cfg) == hash(UNetConfig.sd1())
    with pytest.raises(ValueError):
        UNetConfig(num_heads=-1, num_head_channels=-1)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 21, 500.5, 999])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    err = rel_err(timestep_embedding(t, 320), ref)
    print(f"timestep embedding rel_err {err:.2e}")
    assert err <= 1e-6


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (5, 5), (1, 3)])
def test_forward_shapes(name, hw):
    cfg = TINY[name]
    x, t, ctx = _inputs(cfg, *hw)
    with torch.no_grad():
        out = _model(cfg)(x, t, ctx)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (5, 5)])
def test_parity_with_diffusers(name, hw):
    model = _model(TINY[name])
    ref = diffusers_unet(model)
    x, t, ctx = _inputs(model.config, *hw)
    with torch.no_grad():
        ours = model(x, t, ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    err = rel_err(ours, theirs)
    print(f"tiny {name} {hw} rel_err vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_scalar_timestep_broadcasts():
    model = _model(TINY_CONV)
    x, _, ctx = _inputs(TINY_CONV, 8, 8)
    with torch.no_grad():
        a = model(x, 500, ctx)
        b = model(x, torch.tensor([500, 500]), ctx)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_probs_hook(name):
    cfg = TINY[name]
    model = _model(cfg)
    x, t, ctx = _inputs(cfg, 9, 7)
    with torch.no_grad():
        plain = model(x, t, ctx)
    sites = list(model.attention_sites())
    assert len(sites) == sum(len(m.transformer_blocks) for m in model.modules() if hasattr(m, "transformer_blocks"))
    assert all(s.name.endswith("attn2") and model.get_submodule(s.name) is s.module for s in sites)
    ds_of = {id(s.module): s.ds for s in sites}
    seen = []

    def hook(module, probs):
        seen.append((ds_of[id(module)], module.heads, probs.shape, probs.sum(-1)))

    model.set_cross_attention_hook(hook)
    with torch.no_grad():
        hooked = model(x, t, ctx)
    assert len(seen) == len(sites)
    for ds, heads, shape, sums in seen:
        assert shape == (2, heads, query_hw(9, ds) * query_hw(7, ds), ctx.shape[1])
        torch.testing.assert_close(sums, torch.ones_like(sums))
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    model.set_cross_attention_hook(None)
    assert all(s.module.probs_hook is None for s in model.attention_sites())


def test_probs_hook_head_counts():
    # Heads follow the config: fixed count (conv tiny: 2 everywhere) or channels / head width (linear tiny: 32/16 at
    # the attention level, 64/16 in the middle block).
    for cfg, expected in [(TINY_CONV, {2}), (TINY_LINEAR, {2, 4})]:
        model = _model(cfg)
        heads = set()
        model.set_cross_attention_hook(lambda m, p: heads.add(p.shape[1]))
        x, t, ctx = _inputs(cfg, 4, 4)
        with torch.no_grad():
            model(x, t, ctx)
        assert heads == expected


def test_upcast_attention_low_precision():
    cfg = dataclasses.replace(TINY_LINEAR, upcast_attention=True)
    model = _model(cfg)
    x, t, ctx = _inputs(cfg, 8, 8)
    with torch.no_grad():
        ref = model(x, t, ctx)
        dtypes = set()
        model.bfloat16().set_cross_attention_hook(lambda m, p: dtypes.add(p.dtype))
        low = model(x, t, ctx)
    assert dtypes == {torch.float32} and low.dtype == x.dtype
    err = rel_err(low, ref)
    print(f"bf16 + upcast vs fp32 rel_err {err:.2e}")
    assert err < 5e-2
