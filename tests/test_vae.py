"""VAE tests: shapes, config inference, golden checkpoint keys, sampling, and parity with diffusers' AutoencoderKL.

Parity route: our module is in the original CompVis layout; diffusers' own `convert_ldm_vae_checkpoint` maps that
state dict to diffusers names, so a passing parity test also proves our key names are the ones real files use.
"""
from __future__ import annotations

import gc

import pytest
import torch
from _reference import diffusers_vae
from _util import LDM_KEYS, read_keys_tsv, rel_err

from gbsd_core.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
# Four levels like SD (so f = 8) but narrow: exercises the 8x path and odd latent sizes cheaply.
TINY_F8 = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


def _seeded(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


# ----------------------------------------------------------------------------------------------------- tiny tier


@pytest.mark.parametrize(("cfg", "hw"), [(TINY, (64, 64)), (TINY, (40, 24)), (TINY_F8, (64, 64)), (TINY_F8, (40, 24))])
def test_shapes(cfg: VAEConfig, hw: tuple[int, int]) -> None:
    vae = _seeded(cfg)
    f = cfg.downsample_factor
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert isinstance(post, DiagonalGaussian)
        for t in (post.mean, post.logvar, post.std, post.mode(), post.sample()):
            assert t.shape == (2, cfg.embed_dim, hw[0] // f, hw[1] // f)
        img = vae.decode(post.mode())
    assert img.shape == (2, 3, *hw)
    assert torch.isfinite(img).all()


def test_f8_of_sd_config() -> None:
    assert VAEConfig().downsample_factor == 8
    assert TINY.downsample_factor == 2


def test_encode_rejects_size_not_multiple_of_f() -> None:
    vae = _seeded(TINY_F8)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 36, 40))


@pytest.mark.parametrize("cfg", [TINY, TINY_F8, VAEConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=3, embed_dim=3)])
def test_config_from_state_dict_round_trip(cfg: VAEConfig) -> None:
    sd = _seeded(cfg).state_dict()
    assert VAEConfig.from_state_dict(sd) == cfg
    AutoencoderKL(VAEConfig.from_state_dict(sd)).load_state_dict(sd, strict=True)


def test_double_z_false_is_refused() -> None:
    with pytest.raises(ValueError, match="double_z"):
        VAEConfig(double_z=False)


def _golden_vae_keys(name: str) -> dict[str, tuple[int, ...]]:
    rows = read_keys_tsv(LDM_KEYS / name)
    prefix = "first_stage_model."
    return {k[len(prefix):]: shape for k, (shape, _dtype, _opt) in rows.items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["sd1_v1-inference.tsv", "sd2_v2-inference.tsv"])
def test_keys_match_original_checkpoint(name: str) -> None:
    golden = _golden_vae_keys(name)
    assert len(golden) == 248
    with torch.device("meta"):  # no memory, no init cost: only names and shapes matter here
        vae = AutoencoderKL(VAEConfig())
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing, unexpected = sorted(golden.keys() - ours.keys()), sorted(ours.keys() - golden.keys())
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], golden[k]) for k in golden if ours[k] != golden[k]}
    assert not wrong, f"shape mismatches (ours, golden): {wrong}"
    # Config inference from the golden shapes alone gives the SD config.
    meta_sd = {k: torch.empty(s, device="meta") for k, s in golden.items()}
    assert VAEConfig.from_state_dict(meta_sd) == VAEConfig()


def test_sample_is_deterministic_with_a_seeded_generator() -> None:
    vae = _seeded(TINY)
    with torch.no_grad():
        post = vae.encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    a = post.sample(torch.Generator().manual_seed(0))
    b = post.sample(torch.Generator().manual_seed(0))
    c = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The noise is N(0,1) from the generator, scaled by std around the mean.
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, post.mean + post.std * eps, rtol=0, atol=0)
    assert torch.equal(post.mode(), post.mean)


def test_logvar_is_clamped_like_compvis() -> None:
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 100.0), torch.full((1, 2, 2, 2), -100.0)], 1)
    post = DiagonalGaussian(moments)
    assert post.logvar[:, :2].eq(20.0).all() and post.logvar[:, 2:].eq(-30.0).all()
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))


def test_decode_runs_in_module_dtype() -> None:
    vae = _seeded(TINY)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
        vae_bf16 = vae.to(torch.bfloat16)
        out = vae_bf16.decode(z)  # fp32 input is cast to the module's dtype
        post = vae_bf16.encode(torch.rand(1, 3, 16, 16))
    assert out.dtype == torch.bfloat16 and post.mean.dtype == torch.bfloat16
    err = rel_err(out, ref)
    print(f"bf16 vs fp32 decode rel_err {err:.2e}")
    assert err < 5e-2


# fp64 shows the two computations are the same math (errors ~1e-15), not merely close in fp32.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize(("cfg", "hw"), [(TINY, (64, 64)), (TINY_F8, (40, 24))])
def test_tiny_parity_with_diffusers(cfg: VAEConfig, hw: tuple[int, int], dtype: torch.dtype, tol: float) -> None:
    ours = _seeded(cfg, seed=1)
    ref = diffusers_vae(ours)
    # nn.Module.to on the diffusers model: its own .to() override only adds a fp32-upcast warning here.
    ours, ref = ours.to(dtype), torch.nn.Module.to(ref, dtype)
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(2), dtype=dtype) * 2 - 1
    z = torch.randn(2, 4, hw[0] // cfg.downsample_factor, hw[1] // cfg.downsample_factor,
                    generator=torch.Generator().manual_seed(3), dtype=dtype)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        img, ref_img = ours.decode(z), ref.decode(z).sample
    errs = {
        "mean": rel_err(post.mean, ref_post.mean),
        "logvar": rel_err(post.logvar, ref_post.logvar),
        "std": rel_err(post.std, ref_post.std),
        "decode": rel_err(img, ref_img),
    }
    print(f"tiny VAE {cfg.ch_mult} {hw} {dtype} parity rel_err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(v <= tol for v in errs.values()), errs


# ----------------------------------------------------------------------------------------------- full-size tier


@pytest.fixture(scope="module")
def sd_vae_pair():
    ours = _seeded(VAEConfig(), seed=0)
    ref = diffusers_vae(ours)
    yield ours, ref
    del ours, ref
    gc.collect()


@pytest.mark.fullsize
def test_fullsize_param_count(sd_vae_pair) -> None:
    ours, ref = sd_vae_pair
    n = sum(p.numel() for p in ours.parameters())
    assert n == 83_653_863 == sum(p.numel() for p in ref.parameters())


@pytest.mark.fullsize
def test_fullsize_encode_parity(sd_vae_pair) -> None:
    ours, ref = sd_vae_pair
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    e_mean, e_logvar = rel_err(post.mean, ref_post.mean), rel_err(post.logvar, ref_post.logvar)
    print(f"SD VAE encode 128x128 rel_err: mean {e_mean:.2e}, logvar {e_logvar:.2e}")
    assert post.mean.shape == (1, 4, 16, 16)
    assert e_mean <= 1e-5 and e_logvar <= 1e-5


@pytest.mark.fullsize
def test_fullsize_decode_parity(sd_vae_pair) -> None:
    ours, ref = sd_vae_pair
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img, ref_img = ours.decode(z), ref.decode(z).sample
    err = rel_err(img, ref_img)
    print(f"SD VAE decode 16x16 latent rel_err: {err:.2e}")
    assert img.shape == (1, 3, 128, 128)
    assert err <= 1e-5


@pytest.mark.parametrize("scale", [1e-30, 0.0, -0.18215, 1e6, float("nan"), float("inf")])
def test_an_implausible_scale_factor_is_refused(scale: float) -> None:
    """The decoder divides latents by it: 1e-30 passed as positive and finite, and decoded to inf, then black."""
    with pytest.raises(ValueError, match="scale_factor .* is not a plausible latent scale"):
        VAEConfig(scale_factor=scale)


@pytest.mark.parametrize("scale", [0.13025, 0.18215, 0.3611, 1.5305])  # SDXL, SD1/SD2, Flux, SD3
def test_released_scale_factors_are_accepted(scale: float) -> None:
    assert VAEConfig(scale_factor=scale).scale_factor == scale
