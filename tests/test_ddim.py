"""DDIM parity: ours vs diffusers' DDIMScheduler configured as CompVis runs DDIM, and vs a CompVis re-derivation."""
from __future__ import annotations

import diffusers  # noqa: E402  (test extra: a missing reference library must fail, not skip)
import numpy as np
import pytest
import torch
from _reference import DDIM_CONFIG
from _util import rel_err

from gbsd_core.ddim import DDIMSampler

# Tolerances vs diffusers (rel_err = max|diff| / max|ref|, CPU float32). diffusers' ᾱ is a float32 cumprod, ours (and
# CompVis') a float64 cumprod rounded to float32; they drift apart by up to ~1e-6 relative (printed below).
# Measured: η = 0 steps ≤ 8.6e-7 (at 999 steps); η = 1 steps ≤ 1.8e-6 at 999 steps, where σ_t² contains
# 1 − ᾱ_t/ᾱ_prev = β_t ≈ 1e-3 and that cancellation magnifies the ᾱ drift. Against a float64 evaluation of CompVis'
# formulas on CompVis' own ᾱ buffer we agree to a few float32 ulps (measured ≤ 3.9e-7).
STEP_TOL = 1.5e-6
ETA_TOL = 4e-6
COMPVIS_TOL = 6e-7
N_STEPS = (1, 2, 7, 50, 999, 1000)


def reference(prediction_type: str = "epsilon"):
    return diffusers.DDIMScheduler(**DDIM_CONFIG, prediction_type=prediction_type)


def test_timesteps_equal_diffusers_for_every_n():
    ours, ref = DDIMSampler(), reference()
    for n in range(1, 1000):
        ref.set_timesteps(n)
        ts = ours.timesteps(n)
        assert ts.dtype == torch.long
        assert torch.equal(ts, ref.timesteps), n
    # n = 1000 starts at t = 1000, past the end of alphas_cumprod: the reference builds it and then cannot step it.
    ref.set_timesteps(1000)
    assert int(ref.timesteps[0]) == 1000
    with pytest.raises(IndexError):
        ref.step(torch.zeros(1, 4, 2, 2), 1000, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="t=1000"):
        ours.timesteps(1000)
    # ...its executable part (any strength < 1) is the reference's schedule minus that first step.
    assert torch.equal(ours.timesteps(1000, 0.999), ref.timesteps[1:])
    assert ours.timesteps(50)[:3].tolist() == [981, 961, 941] and ours.timesteps(50)[-1] == 1


def test_alphas_cumprod_is_compvis_float64_rounded_and_near_diffusers():
    # CompVis register_schedule: numpy float64 cumprod, registered as float32.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    compvis = torch.from_numpy(np.cumprod(1.0 - betas).astype(np.float32))
    ours = DDIMSampler().alphas_cumprod
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    assert torch.equal(ours, compvis)
    ref = reference().alphas_cumprod
    err = float(((ours.double() - ref.double()).abs() / ref.double()).max())
    print(f"alphas_cumprod max relative diff vs diffusers (float32 cumprod): {err:.3g}")
    assert err < 2e-6


@pytest.mark.parametrize("n", [10, 20, 25, 50, 100, 200, 250, 500, 1000])
def test_schedule_matches_compvis_construction(n):
    """Re-derive ldm make_ddim_timesteps / make_ddim_sampling_parameters (n dividing 1000: same as diffusers)."""
    ours = DDIMSampler()
    acp = ours.alphas_cumprod  # CompVis' float32 buffer (checked above)
    c = 1000 // n
    ddim_t = np.asarray(list(range(0, 1000, c))) + 1
    alphas = acp[np.minimum(ddim_t, 999)].double().numpy()
    alphas_prev = np.asarray([acp[0].item()] + acp[ddim_t[:-1]].tolist())
    sigmas = 1.0 * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if n == 1000:  # t = 1000 cannot run (see test above); compare the executable 999 steps
        ddim_t, alphas, alphas_prev, sigmas = ddim_t[:-1], alphas[:-1], alphas_prev[:-1], sigmas[:-1]
    ts = ours.timesteps(n, 1.0 if n < 1000 else 0.999)
    assert ts.tolist() == ddim_t[::-1].tolist()
    for i, t in enumerate(ddim_t):  # ddim_t ascends; executed step len(ts) - 1 - i visits it
        assert ours._alpha_prev(int(t)) == pytest.approx(alphas_prev[i], rel=1e-12)
        assert ours.noise_std(len(ts) - 1 - i, 1.0) == pytest.approx(sigmas[i], rel=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", N_STEPS)
def test_step_equals_diffusers(n, eta, prediction_type):
    """Every executed step, with fresh random (model_output, x_t) per step so each coefficient is exercised."""
    ours, ref = DDIMSampler(prediction_type), reference(prediction_type)
    ts = ours.timesteps(n, 1.0 if n < 1000 else 0.999)  # n = 1000: its first step t = 1000 cannot run
    ref.set_timesteps(n)
    assert torch.equal(ts, ref.timesteps[n - len(ts):])
    g = torch.Generator().manual_seed(1234)
    worst_prev = worst_x0 = 0.0
    for k, t in enumerate(ts):
        x = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        # The same z on both sides (diffusers' variance_noise): the caller draws it, as sampling.denoise does.
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(k))
        prev, x0 = ours.update(x, k, out, eta=eta, noise=z if eta else None)
        r = ref.step(out, int(t), x, eta=eta, variance_noise=z if eta else None)
        worst_prev = max(worst_prev, rel_err(prev, r.prev_sample))
        worst_x0 = max(worst_x0, rel_err(x0, r.pred_original_sample))
    print(f"n={n} eta={eta} {prediction_type}: max rel_err prev_sample {worst_prev:.3g}, pred_x0 {worst_x0:.3g}")
    assert worst_x0 <= STEP_TOL and worst_prev <= (STEP_TOL if eta == 0 else ETA_TOL)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", [7, 50, 999])
def test_step_equals_compvis_formula_in_float64(n, eta, prediction_type):
    """ldm DDIMSampler.p_sample_ddim, evaluated in float64 on the float32 ᾱ buffer CompVis registers."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
    c = 1000 // n
    ours = DDIMSampler(prediction_type)
    ts = ours.timesteps(n)
    g = torch.Generator().manual_seed(5)
    worst = 0.0
    for k, t in enumerate(ts.tolist()):
        x = torch.randn(1, 4, 8, 8, generator=g)
        out = torch.randn(1, 4, 8, 8, generator=g)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(k))
        a_t, a_prev = acp[t], (acp[t - c] if t - c >= 0 else acp[0])
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        xd, od = x.double(), out.double()
        if prediction_type == "epsilon":
            e_t = od
            pred_x0 = (xd - np.sqrt(1 - a_t) * e_t) / np.sqrt(a_t)
        else:
            pred_x0 = np.sqrt(a_t) * xd - np.sqrt(1 - a_t) * od
            e_t = np.sqrt(a_t) * od + np.sqrt(1 - a_t) * xd
        want = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - sigma**2) * e_t + sigma * z.double()
        got, got_x0 = ours.update(x, k, out, eta=eta, noise=z if eta else None)
        worst = max(worst, rel_err(got, want), rel_err(got_x0, pred_x0))
    print(f"n={n} eta={eta} {prediction_type}: max rel_err vs float64 CompVis formula {worst:.3g}")
    assert worst <= COMPVIS_TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_chained_sampling_loop_equals_diffusers(prediction_type):
    """A whole 50-step loop with a fake model, so per-step differences could accumulate."""
    ours, ref = DDIMSampler(prediction_type), reference(prediction_type)
    ts = ours.timesteps(50)
    ref.set_timesteps(50)

    def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
        return 0.7 * x + 0.1 * torch.sin(x * 3 + t / 100)

    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    a = b = x_T
    for i, t in enumerate(ts):
        a, _ = ours.update(a, i, fake_model(a, int(t)))
        b = ref.step(fake_model(b, int(t)), int(t), b).prev_sample
    err = rel_err(a, b)
    print(f"50-step chained loop ({prediction_type}): rel_err {err:.3g}")
    assert err <= 1e-5


def test_eta_noise_is_the_callers_noise():
    """With η > 0 the step adds std_t(η)·z with the caller's z (diffusers given that z as variance_noise must agree);
    without a z it refuses, since a sampler draws nothing itself (the run's generator is sampling.denoise's)."""
    s = DDIMSampler()
    t = int(s.timesteps(20)[5])
    x, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    det, _ = s.update(x, 5, out, eta=0.0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sto, _ = s.update(x, 5, out, eta=1.0, noise=z)
    ref = reference()
    ref.set_timesteps(20)
    want = ref.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
    assert rel_err(sto, want) <= ETA_TOL
    assert not torch.allclose(sto, det)
    with pytest.raises(ValueError, match="pass noise="):
        s.update(x, 5, out, eta=1.0)
    with pytest.raises(ValueError, match="noise shape"):
        s.update(x, 5, out, eta=1.0, noise=z[:, :2])


def test_v_prediction_recovers_x0_and_eps():
    """Build x_t and v from known (x_0, ε) with the forward definitions; to_eps_x0 must invert them."""
    s = DDIMSampler("v_prediction")
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in (1, 500, 999):
        a = s.alphas_cumprod[t].double()
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        e, x = s.to_eps_x0(xt, t, v)
        assert rel_err(x, x0) < 1e-12 and rel_err(e, eps) < 1e-12


@pytest.mark.parametrize("n", [1, 2, 7, 10, 50, 999, 1000])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.75, 0.99, 1.0])
def test_img2img_timesteps_equal_pipeline_get_timesteps(n, strength):
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline

    ref = reference()
    ref.set_timesteps(n)
    # The pipeline's own method, called on a minimal object that has only the scheduler.
    want, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), n, strength, "cpu")
    ours = DDIMSampler()
    if n_run == 0:
        with pytest.raises(ValueError, match=rf"int\({n} \* {strength}\) = 0"):
            ours.timesteps(n, strength)
        return
    if int(want[0]) >= 1000:  # n = 1000 at full strength: the un-runnable t = 1000 (see the first test)
        with pytest.raises(ValueError, match="t=1000"):
            ours.timesteps(n, strength)
        return
    got = ours.timesteps(n, strength)
    assert torch.equal(got, want.cpu()) and len(got) == n_run
    # The step size is still that of the full n-step schedule.
    assert ours.num_inference_steps == n


def test_add_noise_equals_diffusers():
    ours, ref = DDIMSampler(), reference()
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for t in (0, 1, 21, 500, 981, 999):
        err = rel_err(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, torch.tensor([t])))
        assert err <= STEP_TOL, (t, err)
    tb = torch.tensor([1, 400, 999])
    err = rel_err(ours.add_noise(x0, noise, tb), ref.add_noise(x0, noise, tb))
    print(f"add_noise per-sample timesteps rel_err {err:.3g}")
    assert err <= STEP_TOL


def test_bad_arguments_raise():
    s = DDIMSampler()
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMSampler("sample")
    zero = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="call timesteps"):
        s.update(zero, 0, zero)
    for n in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.timesteps(n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.timesteps(50.0)  # type: ignore[arg-type]
    for strength in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="strength"):
            s.timesteps(50, strength)
    with pytest.raises(ValueError, match=r"int\(10 \* 0.05\) = 0"):
        s.timesteps(10, 0.05)
    s.timesteps(10)
    with pytest.raises(ValueError, match="outside the run's 10 steps"):
        s.update(zero, 10, zero)
    with pytest.raises(ValueError, match="eta"):
        s.update(zero, 1, zero, eta=-1.0)
    with pytest.raises(ValueError, match="too large"):
        s.update(zero, 9, zero, eta=100.0, noise=zero)
