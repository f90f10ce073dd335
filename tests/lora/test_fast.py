"""The fast path sees merged LoRAs (gbsd_core/lora/merge.py writes in place): fused-QKV stacks, oneDNN-packed copies,
cached cross-attention K/V, a CUDA-graphed stepper (the CPU stand-in of the capture) and an inductor-compiled step
give what the plain path gives after LoRAs are applied, changed and removed, per stage too, without re-capturing or
recompiling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _lora import kohya_state_dict, write

import gbsd_core
import gbsd_core.fast.apply as fast_apply
from gbsd_core.fast import FastOptions, make_stepper
from gbsd_core.fast.attention import FastCrossAttention
from gbsd_core.fast.prepack import PackedConv2d
from gbsd_core.fast.step import eager_capture
from gbsd_core.lora import LoraWeights, apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
SIZE = dict(width=64, height=64)


def _lora(unet, path, seed, text: bool = True):
    """A kohya LoRA on every Linear and Conv2d of the UNet (original names), and on the tiny CLIP's attention."""
    groups = [("lora_unet_", [(n, tuple(m.weight.shape)) for n, m in unet.named_modules()
                              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))])]
    if text:
        groups.append(("lora_te_", [(f"text_model.encoder.layers.{i}.self_attn.{w}_proj", (64, 64))
                                    for i in range(2) for w in "qkv"]))
    return load_lora(write(kohya_state_dict(groups, seed=seed, std=0.15), path))


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-stand-in"])
def test_fast_steppers_see_loras_applied_changed_removed_and_per_stage(responsive_ckpt, tmp_path, monkeypatch, graphs):
    if graphs:  # cuda_graphs on the CPU: the capture's stand-in replays the body on the static buffers
        monkeypatch.setattr(fast_apply, "_check_device", lambda options, device: None)
        monkeypatch.setattr(fast_apply, "CudaGraphCapture", lambda: eager_capture)
    fast, plain = gbsd_core.load(responsive_ckpt), gbsd_core.load(responsive_ckpt)
    a, b = _lora(plain.unet, tmp_path / "a.safetensors", 1), _lora(plain.unet, tmp_path / "b.safetensors", 2)
    opts = FastOptions(channels_last=True, fuse_qkv=True, cache_context_kv=True, cuda_graphs=graphs)  # + prepack
    p = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=4, seed=3, **SIZE)
    stepper = make_stepper(fast, opts, p.cfg, p.eta)
    assert any(isinstance(m, PackedConv2d) for m in fast.unet.modules())
    attn = next(m for m in fast.unet.modules() if isinstance(m, FastCrossAttention) and m.qkv_weight is not None)
    stacked = attn.qkv_weight.clone()
    runs = [("applied", [(a, 0.7)], ()), ("changed", [(a, 0.3), (b, 1.0)], ()), ("removed", [], ()),
            ("focus stage only", [(b, 0.5)], [(a, 0.8)])]
    previous = None
    for what, loras, focus in runs:
        with apply_loras(fast, loras, focus=focus) as on_fast, apply_loras(plain, loras, focus=focus) as on_plain:
            if what == "applied":  # the stacked QKV weight is the merged to_q/to_k/to_v (views of it)
                q = attn.to_q.out_features
                assert torch.equal(attn.qkv_weight[:q], attn.to_q.weight) and not torch.equal(attn.qkv_weight, stacked)
            with stepper:
                ours = np.asarray(generate(fast, p, stepper=stepper, switch=on_fast).image, np.int16)
            ref = np.asarray(generate(plain, p, switch=on_plain).image, np.int16)
        diff = np.abs(ours - ref).max()
        print(f"{'graph stand-in' if graphs else 'eager'} fast path, LoRA {what}: max pixel diff {diff}/255 vs plain")
        assert diff <= 1
        if previous is not None:
            assert np.abs(ours - previous).max() > 2  # each change shows in the image
        previous = ours
    assert torch.equal(attn.qkv_weight, stacked)  # all removed: the stack is the loaded weights again
    if graphs:
        assert stepper.captures == 1  # one shape: captured once, every LoRA change seen by the same graph


def test_the_compiled_step_sees_in_place_merges_without_recompiling(tmp_path):
    """torch.compile (inductor, CPU: freezing) of the whole step, compiled once: with LoRAs applied, changed and
    removed in place it equals the eager fast step on the same weights, and compiles nothing more. (Needs the C++
    compiler; ~2 min of compile on 2 cores.)"""
    import torch._dynamo
    from _fast import gbsd_run, max_rel, tiny_bundle

    from gbsd_core.fast.prepack import prepack_
    from gbsd_core.fast.step import FastStepper

    bundle = tiny_bundle()
    unet = bundle.unet
    a, b = _lora(unet, tmp_path / "a.safetensors", 1, text=False), _lora(unet, tmp_path / "b.safetensors", 2, text=False)
    assert prepack_(unet) > 0
    torch._dynamo.reset()
    compiled = FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True, compile_mode="default")
    weights = LoraWeights(bundle)
    weights.set([(a, 0.7)])
    first = gbsd_run(unet, compiled, n=3)
    results = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for uses in ([(a, 0.7)], [(a, 0.2), (b, 1.0)], []):
            weights.set(uses)
            got = first if len(results) == 0 else gbsd_run(unet, compiled, n=3)
            eager = gbsd_run(unet, FastStepper(unet, None, 7.5, 0.0, cache_context_kv=True), n=3)
            results.append((max_rel(got, eager), got))
    errs = [e for e, _ in results]
    print(f"compiled step vs eager with LoRAs applied / changed / removed: rel errs {', '.join(f'{e:.1e}' for e in errs)}")
    assert max(errs) <= 1e-4
    assert max_rel(results[0][1], results[1][1]) > 1e-2 and max_rel(results[1][1], results[2][1]) > 1e-2
