"""The Python API's entry points check their arguments where they are entered: a wrong type or value is a
ValueError naming the argument, raised before any work (no AttributeError or TypeError from deep inside a run, no
weights read for a load that cannot succeed). The CLI refuses the same things through the same rules (params.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gbsd_core
from gbsd_core import loading
from gbsd_core.bokeh.rack import rack_focus
from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.params import GenerationParams, check_schedule, sweep_axes
from gbsd_core.pipeline import generate, sweep
from gbsd_core.samplers import SAMPLERS, SCHEDULES, SPACINGS, make_sampler
from _util import model_ddim

P = GenerationParams("a bunny and a carrot", focus="a carrot", steps=2, width=64, height=64)
RACK = GenerationParams("a bunny and a carrot", focus="a bunny", focus_to="a carrot", steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def bundle(tiny_ckpt):
    return gbsd_core.load(tiny_ckpt)


# (id, call on (bundle, path), text the ValueError must contain)
RUN_CASES = [
    ("generate-params-dict", lambda b, p: generate(b, {"prompt": "a cat"}), "params must be a GenerationParams"),
    ("generate-bundle-path", lambda b, p: generate(str(p), P), "bundle must be an SDBundle"),
    ("generate-stepper-object", lambda b, p: generate(b, P, stepper=object()), "stepper must be a sampling.Stepper"),
    ("generate-probe-object", lambda b, p: generate(b, P, probe=object()), "probe must be a sampling.Probe"),
    ("generate-watch-object", lambda b, p: generate(b, P, watch=object()), "watch must be a sampling.Watcher"),
    ("sweep-params-dict", lambda b, p: sweep(b, {"prompt": "a cat"}, alphas=[0.5]), "params must be"),
    ("sweep-bundle-none", lambda b, p: sweep(None, P, alphas=[0.5]), "bundle must be an SDBundle"),
    ("rack-params-dict", lambda b, p: rack_focus(b, {"prompt": "a cat"}), "params must be"),
    ("rack-bundle-path", lambda b, p: rack_focus(str(p), RACK, frames=2), "bundle must be an SDBundle"),
    ("make-sampler-schedule-str", lambda b, p: make_sampler("ddim", "epsilon", "euler"), "noise_schedule must be a NoiseSchedule"),
    ("sampler-strength-str", lambda b, p: make_sampler(b.noise_schedule, b.family.prediction_type, "euler").timesteps(10, "0.5"), "strength"),
    ("ddim-strength-str", lambda b, p: model_ddim(b).timesteps(10, "0.5"), "strength"),
    ("make-stepper-options-none", lambda b, p: make_stepper(b, None, 7.5), "options must be a FastOptions"),
    ("make-stepper-bundle-path", lambda b, p: make_stepper(str(p), FastOptions(), 7.5), "bundle must be"),
    ("make-stepper-cfg-str", lambda b, p: make_stepper(b, FastOptions(), "7.5"), "cfg must be a number"),
    ("make-stepper-cfg-nan", lambda b, p: make_stepper(b, FastOptions(), float("nan")), "cfg must be a finite"),
    ("make-stepper-eta-negative", lambda b, p: make_stepper(b, FastOptions(), 7.5, eta=-1.0), "eta must be"),
    ("make-stepper-eta-str", lambda b, p: make_stepper(b, FastOptions(), 7.5, eta="0"), "eta must be"),
]


@pytest.mark.parametrize("call, needle", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_entry_points_refuse_wrong_arguments_by_name(bundle, tiny_ckpt, call, needle):
    with pytest.raises(ValueError, match=needle):
        call(bundle, tiny_ckpt)


LOAD_CASES = [
    ("dtype-int8", dict(dtype=torch.int8), "dtype must be one of"),
    ("dtype-str", dict(dtype="fp16"), "dtype must be one of"),
    ("vae-dtype-bool", dict(vae_dtype=torch.bool), "vae_dtype must be one of"),
    ("device-meta", dict(device="meta"), "meta device holds no data"),
    ("device-unknown", dict(device="quantum"), "not a torch device"),
    ("device-cuda-index", dict(device="cuda:99"), "device cuda:99"),
    ("device-int-list", dict(device=[0]), "not a torch device"),
]


@pytest.mark.parametrize("kwargs, needle", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_load_refuses_dtype_and_device_before_reading_any_file(tiny_ckpt, monkeypatch, kwargs, needle):
    def no_reading(path):
        raise AssertionError("the checkpoint was read before its arguments were checked")

    monkeypatch.setattr(loading, "read_checkpoint", no_reading)
    with pytest.raises(ValueError, match=needle):
        gbsd_core.load(tiny_ckpt, **kwargs)


def test_load_and_build_refuse_what_is_not_a_path_or_a_checkpoint(tiny_ckpt):
    with pytest.raises(ValueError, match="path must be a file or folder name"):
        gbsd_core.load(3)
    with pytest.raises(ValueError, match="checkpoint must be a Checkpoint"):
        loading.build(str(tiny_ckpt))
    with pytest.raises(ValueError, match="meta device"):  # build is public too: the same rule
        loading.build(loading.inspect_checkpoint(tiny_ckpt), device="meta")


def test_every_spacing_either_refuses_a_step_count_or_descends():
    """The class behind DPM++ 2M's linspace spacing at 1000 steps (1001 rounded points on 1000 timesteps: two equal
    σ, a zero-length step in λ and a division by zero in the update): every sampler, schedule and spacing either
    refuses a step count (ValueError) or gives strictly descending noise levels, and `check_schedule` with the same
    spacing says the same."""
    from gbsd_core.noise_schedule import SD

    counts = [*range(1, 1001, 37), 997, 998, 999, 1000]
    for name in (s for s in SAMPLERS[1:] if s != "lcm"):  # lcm takes no schedule or spacing: its own test below
        for schedule in SCHEDULES:
            for spacing in SPACINGS:
                for n in counts:
                    sampler = make_sampler(SD, "epsilon", name, schedule, spacing)
                    params = GenerationParams("p", steps=n, sampler=name, schedule=schedule)
                    try:
                        sampler.timesteps(n)
                    except ValueError:
                        with pytest.raises(ValueError):
                            check_schedule(params, img2img=False, spacing=spacing)
                        continue
                    assert check_schedule(params, img2img=False, spacing=spacing) == n
                    s = sampler.sigmas[:-1]
                    assert bool((s[1:] < s[:-1]).all()) and bool((s > 0).all()), (name, schedule, spacing, n)


def test_lcm_either_refuses_a_step_count_or_descends():
    """LCM runs its own skipped schedule: every step count either is refused (ValueError, and `check_schedule` says
    the same) or gives strictly descending timesteps."""
    from gbsd_core.noise_schedule import SD

    for n in [*range(1, 60, 3), 50, 51, 100, 1000]:
        sampler = make_sampler(SD, "epsilon", "lcm")
        params = GenerationParams("p", steps=n, sampler="lcm", cfg=1.5)
        try:
            timesteps = sampler.timesteps(n)
        except ValueError:
            with pytest.raises(ValueError):
                check_schedule(params, img2img=False)
            continue
        assert check_schedule(params, img2img=False) == n
        assert bool((timesteps[1:] < timesteps[:-1]).all()), n


def test_dpmpp_2m_linspace_at_1000_steps_is_refused_and_999_run_finite(bundle):
    sampler = make_sampler(bundle.noise_schedule, bundle.family.prediction_type, "dpmpp_2m", spacing="linspace")
    with pytest.raises(ValueError, match="do not descend"):
        sampler.timesteps(1000)
    ts = sampler.timesteps(999)
    g = torch.Generator().manual_seed(0)
    x, prev = sampler.start_latents(torch.randn(1, 4, 2, 2, generator=g)), None
    for i in range(len(ts)):
        x, prev = sampler.update(x, i, torch.randn(1, 4, 2, 2, generator=g), prev_x0=prev)
    assert bool(torch.isfinite(x).all())


def test_a_fast_stepper_with_another_spacing_is_checked_by_its_own_schedule(bundle):
    """generate(stepper=) runs the stepper's own sampler, so a step count its spacing cannot run is refused before
    the text encoder runs (the run asks the sampler itself)."""
    p = GenerationParams("p", steps=1000, sampler="dpmpp_2m", width=64, height=64)
    step = make_stepper(bundle, FastOptions(), p.cfg, p.eta, p.sampler, p.schedule, spacing="linspace")
    with pytest.raises(ValueError, match="do not descend"):
        generate(bundle, p, stepper=step)


def test_numpy_scalars_and_fair_values_still_pass(bundle):
    step = make_stepper(bundle, FastOptions(), np.float64(7.5), np.float32(0.0))
    assert step.guidance_scale == 7.5 and step.eta == 0.0


# ----------------------------------------------------------------------------- a sweep's axes (params.sweep_axes)


@pytest.mark.parametrize("kwargs, message", [
    ({"alphas": 0.5}, "alphas must be a list, got float"),
    ({"focus_prompts": "a carrot"}, "focus_prompts must be a list, got str"),
    ({"mixes": {0.5}}, "mixes must be a list, got set"),
    ({"alphas": []}, "a sweep needs at least one alpha"),
    ({"focus_prompts": []}, "a sweep needs a focus prompt"),
    ({"mixes": []}, "a sweep needs at least one focus mix"),
    ({"alphas": [0.5, 1.5]}, "alpha"),  # each cell is a checked GenerationParams
])
def test_sweep_axes_refuse_bad_lists(kwargs, message):
    p = GenerationParams("a bunny and a carrot", focus="a carrot")
    axes = {"alphas": None, "focus_prompts": None, "mixes": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        sweep_axes(p, **axes)


def test_sweep_axes_fill_defaults_and_order_cells_focus_prompt_major():
    p = GenerationParams("a bunny and a carrot", focus="a carrot", alpha=0.3)
    focus_prompts, cells = sweep_axes(p, None, None, None)
    assert focus_prompts == ["a carrot"] and [(c.alpha, c.focus_mix) for c in cells] == [(0.3, 0.0)]
    _, cells = sweep_axes(p, [0.2, 0.4], ["a carrot", "a bunny"], None)
    assert [(c.focus, c.alpha) for c in cells] == [("a carrot", 0.2), ("a carrot", 0.4), ("a bunny", 0.2),
                                                    ("a bunny", 0.4)]
