"""Tiny-config UNet tests: key layout, config inference, shapes at odd sizes, the attention sites, and
numerical parity with diffusers' UNet2DConditionModel (the reference, test-only) on the same weights."""
from __future__ import annotations

import dataclasses
import gc

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
def test_attention_sites_name_every_cross_attention_with_its_level(name):
    cfg = TINY[name]
    model = _model(cfg)
    sites = list(model.attention_sites())
    assert len(sites) == sum(len(m.transformer_blocks) for m in model.modules() if hasattr(m, "transformer_blocks"))
    assert all(s.name.endswith("attn2") and model.get_submodule(s.name) is s.module for s in sites)
    assert [s.name.replace("attn2", "attn1") for s in sites] == [s.name for s in model.attention_sites(cross=False)]
    # ds is the map's downsampling factor: the query count each module sees at a 9x7 latent (forward pre-hooks).
    x, t, ctx = _inputs(cfg, 9, 7)
    seen = {}
    handles = [s.module.register_forward_pre_hook(lambda m, args, s=s: seen.__setitem__(s.name, args[0].shape[1]))
               for s in sites]
    with torch.no_grad():
        model(x, t, ctx)
    for h in handles:
        h.remove()
    assert seen == {s.name: query_hw(9, s.ds) * query_hw(7, s.ds) for s in sites}


def test_head_counts_follow_the_config():
    # Heads follow the config: fixed count (conv tiny: 2 everywhere) or channels / head width (linear tiny: 32/16 at
    # the attention level, 64/16 in the middle block).
    for cfg, expected in [(TINY_CONV, {2}), (TINY_LINEAR, {2, 4})]:
        model = _model(cfg)
        assert {s.module.heads for s in model.attention_sites()} == expected
        assert all(s.module.heads * s.module.dim_head == s.module.to_q.out_features for s in model.attention_sites())


def test_upcast_attention_low_precision(monkeypatch):
    import gbsd_core.attention as attention

    cfg = dataclasses.replace(TINY_LINEAR, upcast_attention=True)
    model = _model(cfg)
    x, t, ctx = _inputs(cfg, 8, 8)
    dtypes = set()
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, k, v, **kw):  # what the attention kernel is handed
        dtypes.add(q.dtype)
        return sdpa(q, k, v, **kw)

    with torch.no_grad():
        ref = model(x, t, ctx)
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
        low = model.bfloat16()(x, t, ctx)
    assert dtypes == {torch.float32} and low.dtype == x.dtype
    err = rel_err(low, ref)
    print(f"bf16 + upcast vs fp32 rel_err {err:.2e}")
    assert err < 5e-2


# ------------------------------------------------------------------------------------------ full size (-m fullsize)
# Full-size SD1.5 / SD2.1 UNet parity against diffusers' UNet2DConditionModel, random seeded weights, fp32. Our UNet
# is built once per architecture (module-scoped); the diffusers twin is built on the meta device and takes our tensors
# (renamed by diffusers' own `convert_ldm_unet_checkpoint`) with assign=True, so the weights exist once in RAM.
@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    cfg = getattr(UNetConfig, request.param)()
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    ref = diffusers_unet(ours, share=True)
    yield request.param, ours, ref
    del ours, ref
    gc.collect()


def _run_fullsize(pair, h: int, w: int, timesteps: list[int]) -> float:
    name, ours, ref = pair
    g = torch.Generator().manual_seed(h * 100 + w)
    b = len(timesteps)
    x = torch.randn(b, 4, h, w, generator=g)
    ctx = torch.randn(b, 77, ours.config.context_dim, generator=g)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        a = ours(x, t, ctx)
        r = ref(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == r.shape == x.shape
    err = rel_err(a, r)
    print(f"full-size {name} {h}x{w} t={timesteps} rel_err vs diffusers {err:.2e}")
    return err


@pytest.mark.fullsize
def test_fullsize_parity_16x16(pair):
    # Batch of 2 at two very different timesteps (one forward: the CPU budget of CI is small).
    assert _run_fullsize(pair, 16, 16, [981, 1]) <= 1e-5


@pytest.mark.fullsize
def test_fullsize_parity_odd_size(pair):
    assert _run_fullsize(pair, 13, 11, [741]) <= 1e-5
