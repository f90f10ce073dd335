"""Cross-attention collection (gbsd_core/bokeh/attnmaps.py) on the tiny random checkpoint: the recomputed
probabilities reproduce each module's output, shapes, totals, which steps and rows count (checked against an
independent softmax written out here), bit-identical images, and no hooks when collection is off."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import gbsd_core
from gbsd_core.attention_sites import attention_sites
from gbsd_core.bokeh.attnmaps import (
    CrossAttentionCollector,
    attention_probs,
    focus_collector,
    prompt_positions,
    word_positions,
)
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.sampling import CFGStep, Stage, denoise, focus_conditioning
from _util import model_ddim

PROMPT, FOCUS = "a bunny and a carrot on grass", "a carrot"
SIZE = dict(width=64, height=64)  # 8x8 latents: the tiny UNet has attn2 at ds 1 (8x8) and ds 2 (4x4)


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)  # a model that listens to its context (conftest.py)


@pytest.fixture(scope="module")
def embeddings(bundle):
    uncond, g, loc = (bundle.encode_prompt(p) for p in ("", PROMPT, FOCUS))
    return uncond, g, focus_conditioning(g, loc, 0.5)


def _run(bundle, model, stages, n, uncond, seed=0):
    """Plain CFG denoise loop over a hand-made schedule (the model's DDIM)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    ddim = model_ddim(bundle)
    with torch.inference_mode():
        for _ in denoise(CFGStep(model, ddim, 7.5), x, ddim.timesteps(n), stages, uncond):
            pass


def test_word_positions():
    tok = torch.tensor([49406, 320, 11927, 49407] + [49407] * 73)  # SD1 padding
    assert word_positions(tok) == [1, 2]
    assert word_positions(torch.tensor([49406, 320, 49407] + [0] * 74)) == [1]  # SD2 pads with 0
    with pytest.raises(ValueError, match="no words"):
        word_positions(torch.tensor([49406, 49407] + [0] * 75))


def _reference_probs(module, x, context):
    """softmax(q k^T / sqrt(d)) written out with plain matmuls (no SDPA, nothing shared with attnmaps)."""
    b, heads, d = x.shape[0], module.heads, module.dim_head
    q = (x.double() @ module.to_q.weight.double().T).reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    k = (context.double() @ module.to_k.weight.double().T).reshape(b, -1, heads, d).permute(0, 2, 1, 3)
    return torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)  # [B, heads, Nq, Nk]


def test_attention_probs_reproduce_every_modules_output(bundle, embeddings):
    """attention_probs (the hook attnmaps reads through) are the probabilities the module really used: probs @ V
    through to_out gives the module's own output, for self- and cross-attention alike."""
    uncond, g, _ = embeddings
    unet = bundle.unet
    sites = [*attention_sites(unet, cross=False), *attention_sites(unet)]
    seen = []

    def check(module, args, out):
        x, context = args[0], args[1] if len(args) > 1 and args[1] is not None else args[0]
        probs = attention_probs(module, x, context)  # [B, heads, Nq, Nk]
        v = module.split_heads(module.to_v(context)).float()
        again = module.to_out(module.merge_heads(probs @ v))
        seen.append((probs.shape, float((probs.sum(-1) - 1).abs().max()), float((again - out).abs().max()),
                     float((probs.double() - _reference_probs(module, x, context)).abs().max())))

    handles = [s.module.register_forward_hook(check) for s in sites]
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), torch.tensor([981, 981]), torch.cat([uncond, g]))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(sites) > 0
    for shape, sum_err, out_err, ref_err in seen:
        assert shape[0] == 2 and sum_err < 1e-5 and out_err < 1e-4 and ref_err < 1e-5


def test_shapes_and_totals_all_positions_sum_to_one(bundle, embeddings):
    _, g, f = embeddings
    n = 4
    stages = [Stage("layout", range(0, 2), g), Stage("focus", range(2, 4), f)]
    words = word_positions(bundle.tokenizer(FOCUS))
    rest = [j for j in range(77) if j not in words]
    every = CrossAttentionCollector(bundle.unet, range(77), levels=(1, 2))
    mid = CrossAttentionCollector(bundle.unet, words)  # default levels (2, 4): only ds 2 exists here
    mid_rest = CrossAttentionCollector(bundle.unet, rest)
    model = bundle.unet
    timesteps = model_ddim(bundle).timesteps(n)
    for c in (every, mid, mid_rest):  # nested wrappers: all three collect in the same run
        model = c.wrap(model, timesteps, stages, cfg=True)
    _run(bundle, model, stages, n, embeddings[0])

    full = every.token_map()
    assert full.shape == (1, 8, 8)  # finest collected grid: ds 1 of an 8x8 latent
    # Per query the softmax over the 77 keys sums to 1, so the mean mass on all positions is 1 everywhere.
    assert torch.allclose(full, torch.ones_like(full), rtol=0, atol=1e-6)  # fp32 softmax
    m, r = mid.token_map(), mid_rest.token_map()
    assert m.shape == (1, 4, 4)  # ds 2 of an 8x8 latent
    print(f"focus-word share of attention: mean {m.mean():.4f}, min {m.min():.4f}, max {m.max():.4f}")
    assert torch.allclose(m + r, torch.ones_like(m), rtol=0, atol=1e-6)  # the words and the rest split the mass
    assert 0 < m.min() and m.max() < 1 and m.std() > 0
    mask = mid.mask(0, (64, 64))
    assert mask.shape == (64, 64) and mask.dtype == np.bool_ and 0 < mask.mean() < 1


def test_only_the_focus_stage_counts_and_only_the_conditional_half(bundle, embeddings):
    """The reference is an independent softmax (_reference_probs), recorded in the same run by a hook of its own."""
    _, g, f = embeddings
    n = 6
    # A three-stage schedule with the focus stage in the middle.
    stages = [Stage("layout", range(0, 2), g), Stage("focus", range(2, 4), f), Stage("tail", range(4, 6), g)]
    timesteps = model_ddim(bundle).timesteps(n)
    words = word_positions(bundle.tokenizer(FOCUS))
    collector = CrossAttentionCollector(bundle.unet, words)
    ds_of = {id(s.module): s.ds for s in attention_sites(bundle.unet)}
    current = {}
    expected: list[torch.Tensor] = []
    uncond_half: list[torch.Tensor] = []

    def ref_hook(module, args):  # probs [2B, heads, Nq, 77]: [uncond; cond]
        probs = _reference_probs(module, args[0], args[1])
        if current["t"] in focus_t and ds_of[id(module)] == 2:
            for half, out in zip(probs.chunk(2), (uncond_half, expected)):
                out.append(half.double()[..., words].sum(-1).mean(1).reshape(1, 4, 4))

    def tracking(x, t, context):
        current["t"] = int(t[0])
        return bundle.unet(x, t, context)

    focus_t = [int(timesteps[i]) for i in range(2, 4)]
    handles = [site.module.register_forward_pre_hook(ref_hook) for site in attention_sites(bundle.unet)]
    try:
        _run(bundle, collector.wrap(tracking, timesteps, stages, cfg=True), stages, n, embeddings[0])
    finally:
        for h in handles:
            h.remove()
    assert collector.timesteps == focus_t
    assert len(expected) == 2 * 4  # 2 focus steps x 4 attn2 layers at ds 2
    ref = torch.stack(expected).mean(0)
    err = float((collector.token_map() - ref).abs().max() / ref.abs().max())
    print(f"collected map vs the independent softmax: rel err {err:.2e}")
    assert err <= 1e-5
    # The unconditional half attends elsewhere, so reading it instead would be caught above.
    assert float((torch.stack(uncond_half).mean(0) - ref).abs().max()) > 100 * err * float(ref.abs().max())


def test_collection_does_not_change_the_image_and_hooks_are_removed(bundle, monkeypatch):
    calls = []
    original = torch.nn.Module.register_forward_pre_hook

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_pre_hook", counting)
    params = GenerationParams(PROMPT, focus=FOCUS, steps=5, layout=0.6, seed=4, **SIZE)
    plain = generate(bundle, params)
    assert calls == []  # collection off: nothing attached, the UNet runs untouched
    collector = CrossAttentionCollector(bundle.unet, word_positions(bundle.tokenizer(FOCUS)))
    collected = generate(bundle, params, probe=collector)
    assert len(calls) == 2 * 4  # 2 focus steps (n_layout = 3 of 5) x 4 attn2 layers at ds 2
    assert np.array_equal(np.asarray(plain.image), np.asarray(collected.image))
    for site in attention_sites(bundle.unet):
        assert not site.module._forward_pre_hooks


def test_sweep_rows_match_single_runs_and_sigma_one_collects_nothing(bundle):
    params = GenerationParams(PROMPT, focus=FOCUS, steps=4, layout=0.5, seed=2, **SIZE)
    words = word_positions(bundle.tokenizer(FOCUS))
    both = CrossAttentionCollector(bundle.unet, words)
    sweep(bundle, params, alphas=[0.0, 1.0], probe=both)
    maps = both.token_map()
    assert maps.shape == (2, 4, 4)
    for row, alpha in enumerate([0.0, 1.0]):
        single = CrossAttentionCollector(bundle.unet, words)
        generate(bundle, GenerationParams(PROMPT, focus=FOCUS, alpha=alpha, steps=4, layout=0.5, seed=2, **SIZE),
                 probe=single)
        err = float((maps[row] - single.token_map()[0]).abs().max())
        print(f"sweep row α={alpha} vs single run: max abs diff {err:.1e}")
        assert err < 1e-5  # batched vs batch-1 matmuls
    assert float((maps[0] - maps[1]).abs().max()) > 1e-3  # the rows are not one map repeated
    none = CrossAttentionCollector(bundle.unet, words)
    generate(bundle, GenerationParams(PROMPT, focus=FOCUS, steps=3, layout=1.0, **SIZE), probe=none)
    assert not none.collected
    with pytest.raises(ValueError, match="layout fraction of 1"):
        none.token_map()


def test_levels_must_exist(bundle):
    with pytest.raises(ValueError, match=r"no cross-attention at levels ds=\(4, 8\)"):
        CrossAttentionCollector(bundle.unet, [1], levels=(4, 8))


def test_sdxl_four_argument_unet_call_is_collected_and_passed_on(tmp_path):
    """SDXL's UNet takes the vector y as a fourth argument: the collector's wrapper passes it on (a UNet with a label
    embedding refuses to run without it), the image stays bit-identical and the focus words' map is collected."""
    from _sdxl import write_tiny_sdxl

    xl = gbsd_core.load(write_tiny_sdxl(tmp_path))
    params = GenerationParams(PROMPT, focus=FOCUS, layout=0.5, steps=4, seed=2, **SIZE)
    collector = CrossAttentionCollector(xl.unet, word_positions(xl.tokenizer(FOCUS)))
    probed = generate(xl, params, probe=collector)
    plain = generate(xl, params)
    assert np.array_equal(np.asarray(probed.image), np.asarray(plain.image))
    assert collector.timesteps == [int(t) for t in model_ddim(xl).timesteps(4)[2:]]  # the focus stage's two steps
    m = collector.token_map()
    assert m.shape == (1, 4, 4) and float(m.min()) >= 0 and float(m.max()) <= 1 and float(m.std()) > 0
    assert collector.mask(0, (64, 64)).any()


def test_focus_words_repeat_with_a_repeated_context(bundle, embeddings):
    """A local prompt's words in a run whose context is repeated whole (prompts' "repeat" padding) come back every
    77 positions; collecting them with `period` gives the map of the context itself (attention splits each key's
    weight equally between its copies), and `focus_collector` works the positions out from the prompt."""
    uncond, g, f = embeddings
    n = 4
    words = word_positions(bundle.tokenizer(FOCUS))
    maps = []
    for r, collector in ((1, CrossAttentionCollector(bundle.unet, words)),
                         (3, CrossAttentionCollector(bundle.unet, words, period=77))):
        stages = [Stage("layout", range(0, 2), g.repeat(1, r, 1)), Stage("focus", range(2, 4), f.repeat(1, r, 1))]
        _run(bundle, collector.wrap(bundle.unet, model_ddim(bundle).timesteps(n), stages, cfg=True), stages, n,
             uncond.repeat(1, r, 1))
        maps.append(collector.token_map())
    assert (maps[0] - maps[1]).abs().max() < 1e-5
    params = GenerationParams(PROMPT, focus=FOCUS, steps=n, **SIZE)
    assert prompt_positions(bundle, "(a carrot:1.4)", params) == (words, 77)  # the brackets are not words
    long = ", ".join(["a carrot"] * 30)  # 2 chunks: words in both, repeating every 154
    positions, period = prompt_positions(bundle, long, params)
    assert period == 154 and positions[0] == 1 and positions[-1] > 77 and 77 not in positions
    assert prompt_positions(bundle, long, replace(params, chunk_padding="empty"))[1] is None
    assert focus_collector(bundle, FOCUS, params).positions == words
