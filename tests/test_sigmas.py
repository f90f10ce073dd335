"""The σ view of the schedule (gbsd_core/sigmas.py): σ schedules and timesteps against diffusers' `set_timesteps`, the
img2img truncation against StableDiffusionImg2ImgPipeline.get_timesteps, k-diffusion's spacing against numpy
re-derivations of k-diffusion's formulas, σ ↔ t, and the σ-space denoiser for ε and v models."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _samplers import COMBOS, SD15_SHIPPED, diffusers_scheduler
from _util import rel_err

from gbsd_core.ddim import DDIMSampler
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler
from gbsd_core.sigmas import karras_sigmas, sigma_to_t, train_sigmas

STEPS = [1, 2, 7, 20, 25, 50, 300]
SIGMA_TOL = 1e-5  # float64 σ from CompVis' float32 ᾱ vs diffusers' float32 σ from a float32 cumprod (measured ≤ 4.4e-6)


def ours(name: str, schedule: str, prediction_type: str = "epsilon", spacing: str = "leading"):
    return make_sampler(SD_SCHEDULE, prediction_type, name, schedule, spacing)


def _check_run(s, ref, label) -> None:
    """Our run (timesteps, σ, x_T scale) against a diffusers scheduler after its set_timesteps."""
    t, ref_t = s.run_timesteps, ref.timesteps
    assert t.shape == ref_t.shape, label
    if t.dtype == torch.long and ref_t.dtype == torch.long:
        assert torch.equal(t, ref_t), label
    else:  # fractional (Karras under Euler): diffusers holds t in float32
        assert float((t.double() - ref_t.double()).abs().max()) <= 1e-3, label
    assert rel_err(s.sigmas, ref.sigmas) <= SIGMA_TOL, label
    assert float(s.sigmas[-1]) == 0.0 and float(ref.sigmas[-1]) == 0.0  # both end at σ = 0


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("name, schedule", COMBOS)
@pytest.mark.parametrize("n", STEPS)
def test_run_equals_diffusers_set_timesteps(name, schedule, n, spacing):
    """"leading" against diffusers configured so; "linspace" against SD1.5's shipped config as it is (no spacing key:
    diffusers' from_config gives the class default, linspace)."""
    s = ours(name, schedule, spacing=spacing)
    ref = diffusers_scheduler(name, schedule, config=SD15_SHIPPED) if spacing == "linspace" else \
        diffusers_scheduler(name, schedule)
    assert ref.config.timestep_spacing == spacing
    s.timesteps(n)
    ref.set_timesteps(n)
    _check_run(s, ref, (name, schedule, n, spacing))
    # The txt2img start: x_T times diffusers' init_noise_sigma (Euler: √(σ_max²+1) under "leading", σ_max under
    # "linspace"; DPM++ keeps the VP x_T, which is x_T·√(σ_0²+1) in σ-space).
    scale = float(s.start_latents(torch.ones(1, dtype=torch.float64))[0])
    want = float(ref.init_noise_sigma) if name != "dpmpp_2m" else (float(ref.sigmas[0]) ** 2 + 1) ** 0.5
    assert abs(scale - want) / want <= SIGMA_TOL


def test_leading_timesteps_as_documented():
    e, d = ours("euler", "normal"), ours("dpmpp_2m", "normal")
    assert e.timesteps(20).tolist() == list(range(951, 0, -50))  # DDIM's own
    assert torch.equal(e.run_timesteps, DDIMSampler().timesteps(20))
    assert d.timesteps(20).tolist() == list(range(941, 47, -47))  # 941, 894, …, 48
    lin = ours("dpmpp_2m", "normal", spacing="linspace")
    assert lin.timesteps(20).tolist()[:3] == [999, 949, 899] and int(lin.run_timesteps[-1]) == 50
    assert ours("euler", "normal", spacing="linspace").timesteps(7).tolist() == [999.0, 832.5, 666.0, 499.5, 333.0,
                                                                                 166.5, 0.0]
    k = ours("dpmpp_2m", "karras")
    k.timesteps(20)
    assert k.run_timesteps.dtype == torch.long and int(k.run_timesteps[0]) == 999  # rounded t(σ_max)
    assert abs(float(k.sigmas[0]) - float(train_sigmas(DDIMSampler().alphas_cumprod)[-1])) < 1e-12


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("name, schedule", COMBOS)
@pytest.mark.parametrize("n, strength", [(10, 0.5), (20, 0.75), (25, 0.3), (7, 0.99), (50, 0.05)])
def test_img2img_runs_what_the_img2img_pipeline_runs(name, schedule, n, strength, spacing):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = diffusers_scheduler(name, schedule, config=SD15_SHIPPED) if spacing == "linspace" else \
        diffusers_scheduler(name, schedule)
    ref.set_timesteps(n)
    want, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), n, strength, "cpu")
    s = ours(name, schedule, spacing=spacing)
    got = s.timesteps(n, strength)
    assert len(got) == n_run == int(n * strength)
    assert float((got.double() - want.double()).abs().max()) <= 1e-3
    # The start: diffusers' add_noise at the begin index it set; x0 + σ·ε in σ-space (DPM++: α·x0 + ασ·ε, VP).
    x0, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    start = s.start_latents(eps, x0)
    theirs = ref.add_noise(x0, eps, want[:1])
    if name == "dpmpp_2m":
        start = start / (float(s.sigmas[0]) ** 2 + 1) ** 0.5
    assert rel_err(start, theirs) <= SIGMA_TOL


def test_img2img_bad_strengths_are_refused_like_ddim():
    s = ours("euler", "normal")
    with pytest.raises(ValueError, match=r"int\(10 \* 0.05\) = 0"):
        s.timesteps(10, 0.05)
    with pytest.raises(ValueError, match="strength"):
        s.timesteps(10, 1.5)
    with pytest.raises(ValueError, match="t=1000"):
        s.timesteps(1000)  # leading + 1 starts past t = 999, as DDIM's
    with pytest.raises(ValueError, match="t=1000"):
        ours("dpmpp_2m", "normal").timesteps(999)
    assert len(ours("dpmpp_2m", "normal").timesteps(998)) == 998


# ------------------------------------------------------------------------------------------ k-diffusion's spacing


def _log_sigma_table() -> np.ndarray:
    return np.log(train_sigmas(DDIMSampler().alphas_cumprod).numpy())


def _k_sigmas(n: int, schedule: str) -> np.ndarray:
    """k-diffusion DiscreteSchedule.get_sigmas / get_sigmas_karras, re-derived with numpy (float64)."""
    log_s = _log_sigma_table()
    if schedule == "karras":  # get_sigmas_karras(n, sigma_min=sigmas[0], sigma_max=sigmas[-1], rho=7)
        lo, hi = np.exp(log_s[0]) ** (1 / 7), np.exp(log_s[-1]) ** (1 / 7)
        return (hi + np.linspace(0, 1, n) * (lo - hi)) ** 7
    return np.exp(np.interp(np.linspace(999, 0, n), np.arange(1000), log_s))  # t_to_sigma: linear in log σ


@pytest.mark.parametrize("schedule", ["normal", "karras"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("n", [1, 7, 20, 30])
def test_k_diffusion_spacing_is_k_diffusions(name, schedule, n):
    s = ours(name, schedule, spacing="k-diffusion")
    s.timesteps(n)
    want = _k_sigmas(n, schedule)
    assert np.abs(s.sigmas[:-1].numpy() - want).max() / want.max() <= 1e-12 and float(s.sigmas[-1]) == 0.0
    # The UNet sees t(σ) unquantised (A1111's default): np.interp inverts the increasing log σ table.
    t_want = np.interp(np.log(want), _log_sigma_table(), np.arange(1000))
    assert np.abs(s.run_timesteps.double().numpy() - t_want).max() <= 1e-9
    assert float(s.start_latents(torch.ones(1, dtype=torch.float64))[0]) == pytest.approx(want[0], rel=1e-12)  # x = σ_0·x_T


def test_k_diffusion_karras_equals_diffusers_linspace_karras():
    """diffusers' Euler with linspace spacing spans the whole trained range, so its Karras σ are k-diffusion's."""
    ref = diffusers_scheduler("euler", "karras", config=dict(diffusers_scheduler("euler").config,
                                                               timestep_spacing="linspace"))
    for n in (7, 20):
        ref.set_timesteps(n)
        s = ours("euler", "karras", spacing="k-diffusion")
        s.timesteps(n)
        _check_run(s, ref, n)
        assert float(s.start_latents(torch.ones(1, dtype=torch.float64))[0]) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


# ------------------------------------------------------------------------------------------ σ ↔ t, Karras, D(x; σ)


def test_sigma_to_t_inverts_the_table_and_interpolates_in_log_sigma():
    table = train_sigmas(DDIMSampler().alphas_cumprod)
    t = torch.arange(1000, dtype=torch.float64)
    assert float((sigma_to_t(table, table) - t).abs().max()) <= 1e-9
    sig = torch.exp(torch.linspace(float(table[0].log()), float(table[-1].log()), 257, dtype=torch.float64))
    want = np.interp(sig.log().numpy(), table.log().numpy(), np.arange(1000))
    assert np.abs(sigma_to_t(sig, table).numpy() - want).max() <= 1e-9
    # Outside the trained range t is clamped to [0, 999].
    assert sigma_to_t(torch.tensor([1e-4, 100.0], dtype=torch.float64), table).tolist() == [0.0, 999.0]


def test_karras_sigmas_are_eq5():
    s = karras_sigmas(10, 0.03, 14.6)
    assert s[0] == pytest.approx(14.6, rel=1e-14) and s[-1] == pytest.approx(0.03, rel=1e-14)
    steps = s ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(9), rtol=0, atol=1e-13)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_recovers_x0_and_the_unet_sees_x_t(prediction_type):
    """Build x_t and ε or v from a known (x_0, ε) with the forward definitions; the σ-space denoiser must invert them."""
    s = ours("euler", "normal", prediction_type)
    s.timesteps(10)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).unbind(0)
    a_table = DDIMSampler().alphas_cumprod.double()
    for i, t in enumerate(s.run_timesteps.tolist()):
        a = a_table[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        x = x_t / a.sqrt()  # σ-space
        out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        assert rel_err(s.model_input(x, i), x_t) <= 1e-12
        assert rel_err(s.denoised(x, i, out), x0) <= 1e-12


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler(SD_SCHEDULE, "epsilon", "heun")
    with pytest.raises(ValueError, match="schedule"):
        make_sampler(SD_SCHEDULE, "epsilon", "euler", "exponential")
    with pytest.raises(ValueError, match="spacing"):
        make_sampler(SD_SCHEDULE, "epsilon", "euler", "normal", "exponential")
    with pytest.raises(ValueError, match="ddim sampler runs DDIM timesteps"):
        make_sampler(SD_SCHEDULE, "epsilon", "ddim", "karras")
    with pytest.raises(ValueError, match="leading or trailing spacing"):
        make_sampler(SD_SCHEDULE, "epsilon", "ddim", "normal", "linspace")
    s = ours("euler", "normal")
    with pytest.raises(ValueError, match="call timesteps"):
        s.model_input(torch.zeros(1, 4, 2, 2), 0)
    s.timesteps(4)
    with pytest.raises(ValueError, match="outside the run"):
        s.update(torch.zeros(1, 4, 2, 2), 4, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="eta"):
        s.update(torch.zeros(1, 4, 2, 2), 0, torch.zeros(1, 4, 2, 2), eta=0.5)
