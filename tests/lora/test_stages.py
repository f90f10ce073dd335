"""Per-stage LoRAs (GBSD): `AppliedLoras` as the `sampling.StageSwitch` of a run. A focus-only LoRA equals a run
whose UNet weights are changed by hand right after step n_layout − 1; a sweep still shares its layout stage; the
layout set is what a run without a focus stage sees."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _lora import ALPHA, RANK, kohya_state_dict, same_state, snapshot, write

import gbsd_core
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.sampling import layout_steps

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


@pytest.fixture(scope="module")
def detail(bundle, tmp_path_factory):
    """A LoRA on every attention projection of the tiny UNet (original names) plus two text-encoder modules."""
    unet = [(n, tuple(m.weight.shape)) for n, m in bundle.unet.named_modules()
            if isinstance(m, torch.nn.Linear) and ".attn" in n]
    text = [("text_model.encoder.layers.0.self_attn.q_proj", (64, 64)), ("text_model.encoder.layers.1.mlp.fc2",
                                                                        (64, 256))]
    sd = kohya_state_dict([("lora_unet_", unet), ("lora_te_", text)], seed=7, std=0.3)
    return load_lora(write(sd, tmp_path_factory.mktemp("detail") / "detail.safetensors")), sd


def _pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


class _HandSwitch:
    """A Watcher that adds the LoRA's ΔW to the UNet weights by hand, W += scale·(alpha/r)·up @ down, right after the
    state of step n_layout − 1 has been handed on (the run's generator computes step n_layout only after that)."""

    def __init__(self, bundle, sd: dict, scale: float, n_layout: int) -> None:
        self.bundle, self.sd, self.scale, self.n_layout, self.switched = bundle, sd, scale, n_layout, []

    def watch(self, states, timesteps, stages):
        for state in states:
            yield state
            if state.step == self.n_layout - 1:
                with torch.no_grad():
                    for name, m in self.bundle.unet.named_modules():
                        key = "lora_unet_" + name.replace(".", "_")
                        if f"{key}.lora_up.weight" in self.sd:
                            up, down = self.sd[f"{key}.lora_up.weight"], self.sd[f"{key}.lora_down.weight"]
                            m.weight.add_(self.scale * (ALPHA / RANK) * up @ down)
                self.switched.append(state.step)


def test_a_focus_only_lora_equals_weights_switched_by_hand_at_n_layout(bundle, detail):
    lora, sd = detail
    params = GenerationParams(PROMPT, focus=FOCUS, alpha=0.4, layout=0.6, steps=8, seed=3, **SIZE)
    n_layout = layout_steps(8, 0.6)
    before = snapshot(bundle.unet, bundle.text_encoder)
    layout_states = []

    class Keep:
        def watch(self, states, timesteps, stages):
            for s in states:
                layout_states.append(s.latents.clone()) if s.step < n_layout else None
                yield s

    with apply_loras(bundle, focus=[(lora, 0.8)]) as applied:
        ours = generate(bundle, params, switch=applied, watch=Keep())
        assert applied.skipped_text == 2  # stage LoRAs adapt the UNet only: the prompts are encoded once
    assert same_state(before, bundle.unet, bundle.text_encoder)
    hand = _HandSwitch(bundle, sd, 0.8, n_layout)
    by_hand = generate(bundle, params, watch=hand)
    for name, value in before[0].items():  # undo the hand merge
        bundle.unet.state_dict()[name].copy_(value)
    plain_states = []

    class KeepPlain:
        def watch(self, states, timesteps, stages):
            for s in states:
                plain_states.append(s.latents.clone()) if s.step < n_layout else None
                yield s

    plain = generate(bundle, params, watch=KeepPlain())
    diff = np.abs(_pixels(ours) - _pixels(by_hand)).max()
    print(f"focus-only LoRA vs the weights switched by hand after step {n_layout - 1}: max pixel diff {diff}/255; "
          f"vs no LoRA: {np.abs(_pixels(ours) - _pixels(plain)).max()}/255")
    assert hand.switched == [n_layout - 1] and diff <= 1
    assert np.abs(_pixels(ours) - _pixels(plain)).max() > 2  # the focus LoRA changes the image
    assert all(torch.equal(a, b) for a, b in zip(layout_states, plain_states, strict=True))  # layout stage untouched


def test_a_sweep_shares_the_layout_stage_with_a_focus_lora(bundle, detail):
    lora, _ = detail
    n, layout = 6, 0.5
    params = GenerationParams(PROMPT, layout=layout, steps=n, seed=5, **SIZE)
    with apply_loras(bundle, focus=[(lora, 0.8)]) as applied:
        results = sweep(bundle, params, alphas=[0.0, 0.7], focus_prompts=[FOCUS, "a bunny"], switch=applied)
        n_layout = layout_steps(n, layout)
        assert results[0].unet_calls == n_layout + len(results) * (n - n_layout)
        for r in results:
            single = generate(bundle, GenerationParams(PROMPT, focus=r.params.focus, alpha=r.params.alpha,
                                                       layout=layout, steps=n, seed=5, **SIZE), switch=applied)
            assert np.abs(_pixels(r) - _pixels(single)).max() <= 1  # batched vs batch-1 matmuls: ≤ 1/255


def test_a_run_without_a_focus_stage_gets_the_layout_set(bundle, detail):
    """Plain SD (one "global" stage) is GBSD with a layout fraction of 1 (one "layout" stage): both get loras +
    layout, bit for bit."""
    lora, _ = detail
    with apply_loras(bundle, layout=[(lora, 0.5)]) as applied:
        plain = generate(bundle, GenerationParams(PROMPT, steps=4, seed=2, **SIZE), switch=applied)
        layout_one = generate(bundle, GenerationParams(PROMPT, focus=FOCUS, layout=1.0, steps=4, seed=2, **SIZE),
                             switch=applied)
    without = generate(bundle, GenerationParams(PROMPT, steps=4, seed=2, **SIZE))
    assert np.array_equal(_pixels(plain), _pixels(layout_one))
    assert np.abs(_pixels(plain) - _pixels(without)).max() > 2
