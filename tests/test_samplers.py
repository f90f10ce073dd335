"""The samplers' update rules (gbsd_core/euler.py, euler_ancestral.py, dpmpp_2m.py; the interface in samplers.py),
step by step with a stand-in model: against diffusers' schedulers, against float64 loops written here in the papers'
own (VP) notation, and against our DDIM, which Euler and Euler a equal in σ-space.

Ancestral noise: diffusers' EulerAncestralDiscreteScheduler draws z with `randn_tensor(..., generator)`; the tests
replace that function in the scheduler's module with one that hands out, in order, the same z our loop is given, and
count the calls, so both sides add identical noise (diffusers draws one z more than we do: at the last step, where it
is multiplied by σ_up = 0).
"""
from __future__ import annotations

import math

import pytest
import torch
from _samplers import COMBOS, diffusers_scheduler, inject_ancestral_noise, vp_scale
from _util import rel_err

from gbsd_core.ddim import DDIMSampler
from gbsd_core.noise_schedule import SD as SD_SCHEDULE
from gbsd_core.samplers import make_sampler

TOL = 1e-5  # latents at every step, fp32 (measured: ≤ 4e-6)


def fake_model(x: torch.Tensor, t: float) -> torch.Tensor:
    """A deterministic stand-in for the guided UNet output at (input, t)."""
    return 0.7 * x + 0.1 * torch.sin(3.0 * x + t / 100.0)


def x_T(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def noises(n: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 8, 8, generator=g) for _ in range(n)]


def our_loop(s, n: int, zs: list[torch.Tensor], restart_at: int | None = None) -> list[torch.Tensor]:
    """Our sampler over n steps as sampling.denoise drives it: noise where noise_std > 0, the previous x̂_0 as history
    (None at `restart_at`, what denoise(restart_history=True) does at a stage's first step)."""
    ts = s.timesteps(n)
    x, prev, out = s.start_latents(x_T()), None, []
    for i in range(len(ts)):
        z = zs[i] if s.noise_std(i, 0.0) > 0 else None
        prev = None if i == restart_at else prev
        x, prev = s.update(x, i, fake_model(s.model_input(x, i), float(ts[i])), noise=z, prev_x0=prev)
        out.append(x)
    return out


@pytest.fixture
def ancestral_noise(monkeypatch):
    return inject_ancestral_noise(monkeypatch)  # see the module docstring


@pytest.mark.parametrize("name, schedule", COMBOS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [7, 20])
def test_loop_equals_diffusers_scheduler(name, schedule, prediction_type, n, ancestral_noise):
    s = make_sampler(SD_SCHEDULE, prediction_type, name, schedule)
    ref = diffusers_scheduler(name, schedule, prediction_type)
    zs = noises(n)
    ours = our_loop(s, n, zs)
    ancestral_noise.extend(zs)
    ref.set_timesteps(n)
    x, worst = x_T() * ref.init_noise_sigma, 0.0
    for i, t in enumerate(ref.timesteps):
        x = ref.step(fake_model(ref.scale_model_input(x, t), float(t)), t, x).prev_sample
        # DPM++ keeps the VP latent α·x (sigmas.py); at the last step α = 1.
        mine = ours[i] * vp_scale(float(s.sigmas[i + 1])) if name == "dpmpp_2m" else ours[i]
        worst = max(worst, rel_err(mine, x))
    print(f"{name} {schedule} {prediction_type} {n} steps vs diffusers step(): worst per-step rel err {worst:.2e}")
    assert worst <= TOL
    if name == "euler_a":
        assert len(ancestral_noise) == 0  # diffusers took every z we gave it: the noise was the same


# ------------------------------------------------------------------------------------------ the papers' VP form


def paper_loop(name: str, s, n: int, prediction_type: str, zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """float64, written in VP notation (x̃ = α x, α = 1/√(σ²+1), σ̃ = σα, ᾱ = α²) from the papers: Euler as DDIM
    η = 0 (Song et al. eq. 12), Euler a as DDIM η = 1 (the DDPM posterior noise), DPM++ 2M as Lu et al. 2022
    Algorithm 2. Returns the σ-space latents x̃/α after every step, for comparison."""
    sig, ts = s.sigmas.tolist(), s.run_timesteps
    vp = [(1.0 / math.sqrt(q * q + 1.0), q / math.sqrt(q * q + 1.0)) for q in sig]  # (α_i, σ̃_i)
    x = x_T(torch.float64) * vp[0][0] * (math.sqrt(sig[0] ** 2 + 1.0) if s.spacing == "leading" else sig[0])
    prev, out = None, []
    for i in range(len(ts)):
        (a, sd), (a2, sd2) = vp[i], vp[i + 1]
        f = fake_model(x, float(ts[i]))  # x̃ is what the UNet sees
        x0 = (x - sd * f) / a if prediction_type == "epsilon" else a * x - sd * f
        eps = (x - a * x0) / sd
        if name == "euler":
            x = a2 * x0 + sd2 * eps
        elif name == "euler_a":
            # DDIM's σ_t(η = 1)² = (1−ᾱ')/(1−ᾱ)·(1 − ᾱ/ᾱ'), the DDPM posterior variance
            std = math.sqrt((sd2**2 / sd**2) * (1.0 - a**2 / a2**2)) if sd2 else 0.0
            x = a2 * x0 + math.sqrt(sd2**2 - std**2) * eps + std * zs[i].double()
        else:
            if sd2 == 0.0:
                x = x0  # λ = ∞
            else:
                lam, lam2 = math.log(a / sd), math.log(a2 / sd2)
                h = lam2 - lam
                d = x0
                if prev is not None:
                    a0, sd0 = vp[i - 1]
                    r = (lam - math.log(a0 / sd0)) / h
                    d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
                x = (sd2 / sd) * x - a2 * (math.exp(-h) - 1.0) * d
            prev = x0
        out.append(x / a2)
    return out


@pytest.mark.parametrize("name, schedule", COMBOS)
@pytest.mark.parametrize("spacing", ["leading", "k-diffusion"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loop_equals_the_papers_vp_form_in_float64(name, schedule, spacing, prediction_type):
    n = 12
    s = make_sampler(SD_SCHEDULE, prediction_type, name, schedule, spacing)
    zs = noises(n)
    ours = our_loop(s, n, zs)
    ref = paper_loop(name, s, n, prediction_type, zs)
    worst = max(rel_err(a, b) for a, b in zip(ours, ref))
    print(f"{name} {schedule} {spacing} {prediction_type} vs float64 VP form: worst per-step rel err {worst:.2e}")
    assert worst <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name, eta", [("euler", 0.0), ("euler_a", 1.0)])
def test_euler_is_ddim_in_sigma_space(name, eta, prediction_type):
    """On DDIM's timesteps Euler is DDIM η = 0, and Euler a is DDIM η = 1 (same z), divided by √ᾱ — but for the last
    step, where DDIM stops at ᾱ_0's noise level and the σ samplers go to σ = 0."""
    n = 10
    ddim = DDIMSampler(prediction_type)
    s = make_sampler(SD_SCHEDULE, prediction_type, name)
    zs = noises(n)
    ours = our_loop(s, n, zs)
    ts = ddim.timesteps(n)
    x = x_T()
    for i in range(n - 1):
        x, _ = ddim.update(x, i, fake_model(x, float(ts[i])), eta=eta, noise=zs[i])
        a_next = float(ddim.alphas_cumprod[ts[i + 1]])
        assert rel_err(ours[i] * math.sqrt(a_next), x) <= TOL, i


def test_dpmpp_2m_restart_is_a_first_order_step():
    """With no history (a restart at a stage switch) the step is the first-order DPM-Solver++ = DDIM (η = 0) step;
    with history it differs."""
    n = 10
    s = make_sampler(SD_SCHEDULE, "epsilon", "dpmpp_2m", "karras")
    kept, restarted = our_loop(s, n, []), our_loop(s, n, [], restart_at=5)
    assert all(torch.equal(a, b) for a, b in zip(kept[:5], restarted[:5]))
    x, i = kept[4], 5
    out = fake_model(s.model_input(x, i), float(s.run_timesteps[i]))
    d = s.denoised(x, i, out)
    first_order = d + s.sigma(i + 1) * (x - d) / s.sigma(i)
    assert rel_err(restarted[5], first_order) <= 1e-6
    assert rel_err(restarted[5], kept[5]) > 1e-4  # the history matters
    with pytest.raises(ValueError, match="no previous step"):
        s.update(x, 0, out, prev_x0=d)


def test_euler_ancestral_noise_levels():
    s = make_sampler(SD_SCHEDULE, "epsilon", "euler_a", "karras")
    s.timesteps(8)
    for i in range(8):
        down, up = s.ancestral_step(i)
        assert down**2 + up**2 == pytest.approx(s.sigma(i + 1) ** 2, rel=1e-12, abs=1e-15)
        assert s.noise_std(i, 0.0) == up and (up > 0) == (i < 7)  # no noise into σ = 0
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="pass noise"):
        s.update(x, 0, x)
    with pytest.raises(ValueError, match="noise shape"):
        s.update(x, 0, x, noise=torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="eta"):
        s.noise_std(0, 1.0)


def test_ddim_fits_the_interface_without_changing_its_numbers():
    d = DDIMSampler()
    ts = d.timesteps(10, 0.6)
    g = torch.Generator().manual_seed(2)
    x, out, z = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    for i, t in enumerate(ts.tolist()):
        a, a_prev = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[max(t - 100, 0)])  # T // n = 100
        assert d.noise_std(i, 0.5) == pytest.approx(0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)),
                                                    rel=1e-12)
        assert d.noise_std(i, 0.0) == 0.0 and d.model_input(x, i) is x
        a = float(d.alphas_cumprod[t])
        assert float(d.sigmas[i]) == pytest.approx(math.sqrt((1 - a) / a), rel=1e-12)
    assert torch.equal(d.start_latents(z), z)
    assert torch.equal(d.start_latents(z, x), d.add_noise(x, z, int(ts[0])))
    made = make_sampler(SD_SCHEDULE, "epsilon")
    assert isinstance(made, DDIMSampler) and torch.equal(made.alphas_cumprod, d.alphas_cumprod)
