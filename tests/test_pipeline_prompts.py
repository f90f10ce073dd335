"""Runs with prompts as A1111 writes them (gbsd_core/prompts/ through the pipeline): plain prompts make today's images
bit for bit; a prompt and a negative prompt of different chunk counts give A1111's separate UNet calls ("repeat") or
its padded one ("empty"); GBSD across chunk counts; sweeps, the fast path and prompt editing as `Stage` lists."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _fast import fast_generate
from _reference import DDIM_CONFIG, diffusers_unet
from _util import model_ddim

import gbsd_core
from gbsd_core.fast import FastOptions
from gbsd_core.pipeline import GenerationParams, generate, sweep
from gbsd_core.prompts.parser import PromptError
from gbsd_core.sampling import CFGStep, Stage, denoise, focus_conditioning, gbsd_stages, layout_steps

PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"
LONG = ", ".join(["a bunny with long soft ears"] * 14) + ", bokeh"  # 2 chunks
LONGER = ", ".join(["a carrot"] * 60)  # 3 chunks
SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def chunks(bundle, prompt: str) -> int:
    return bundle.conditioning(prompt, (64, 64)).context.shape[1] // 77


def test_prompt_lengths(bundle):
    assert (chunks(bundle, PROMPT), chunks(bundle, LONG), chunks(bundle, LONGER)) == (1, 2, 3)


def _today(bundle, params: GenerationParams, x_T: torch.Tensor) -> np.ndarray:
    """The image of the path before prompts/: bundle.encode_prompt's [1, 77] embeddings through the same stages."""
    sampler = model_ddim(bundle)
    ts = sampler.timesteps(params.steps)
    e = {p: bundle.encode_prompt(p) for p in (params.prompt, params.focus, params.negative)}
    focus = focus_conditioning(e[params.prompt], e[params.focus], params.alpha)
    stages = gbsd_stages(e[params.prompt], focus, params.steps, params.layout)
    with torch.inference_mode():
        *_, last = denoise(CFGStep(bundle.unet, sampler, params.cfg), sampler.start_latents(x_T), ts, stages,
                           e[params.negative])
    return np.asarray(bundle.decode_latents(last.latents)[0], dtype=np.int16)


def test_plain_prompts_make_todays_image_bit_for_bit(bundle):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    p = GenerationParams(PROMPT, focus=FOCUS, alpha=0.3, layout=0.5, steps=6, negative="blurry", **SIZE)
    assert np.array_equal(pixels(generate(bundle, p, x_T=x_T)), _today(bundle, p, x_T))


# ------------------------------------------------------------------------- unequal positive / negative lengths


def _separate_calls(bundle, cond: torch.Tensor, uncond: torch.Tensor, n: int, x_T: torch.Tensor) -> np.ndarray:
    """A1111's default for a prompt and a negative prompt of different lengths, independently: diffusers' UNet (the
    twin of ours) and DDIMScheduler, the conditional and the unconditional prediction as two calls of their own
    context lengths, then guidance."""
    from diffusers import DDIMScheduler

    unet = diffusers_unet(bundle.unet)
    sched = DDIMScheduler(**DDIM_CONFIG)
    sched.set_timesteps(n)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            e_u = unet(x, t, encoder_hidden_states=uncond).sample
            e_c = unet(x, t, encoder_hidden_states=cond).sample
            x = sched.step(e_u + 7.5 * (e_c - e_u), t, x, eta=0.0).prev_sample
    image = np.asarray(bundle.decode_latents(x)[0], dtype=np.int16)
    assert 0.2 < np.mean((image > 5) & (image < 250)), "saturated reference: the comparison would be empty"
    return image


@pytest.mark.parametrize("prompt, negative", [(LONG, "blurry"), (PROMPT, LONG), (LONGER, LONG)],
                         ids=["2-vs-1", "1-vs-2", "3-vs-2"])
def test_repeat_is_a1111s_separate_calls(bundle, prompt, negative):
    n = 6
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = generate(bundle, GenerationParams(prompt, negative=negative, steps=n, **SIZE), x_T=x_T)
    cond, uncond = (bundle.conditioning(p, (64, 64), negative=i == 1).context for i, p in enumerate((prompt, negative)))
    diff = np.abs(pixels(ours) - _separate_calls(bundle, cond, uncond, n, x_T)).max()
    print(f"{cond.shape[1]} vs {uncond.shape[1]} positions, one batched call (repeat) vs two calls: "
          f"max pixel diff {diff}/255")
    assert diff <= 1


def test_empty_pads_with_the_empty_prompts_chunk(bundle):
    n = 6
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = generate(bundle, GenerationParams(LONG, negative="blurry", steps=n, chunk_padding="empty", **SIZE), x_T=x_T)
    cond = bundle.conditioning(LONG, (64, 64)).context
    uncond = torch.cat([bundle.conditioning("blurry", (64, 64)).context, bundle.encode_prompt("")], dim=1)
    assert uncond.shape == cond.shape
    diff = np.abs(pixels(ours) - _separate_calls(bundle, cond, uncond, n, x_T)).max()
    print(f"empty-chunk padding vs the padded reference: max pixel diff {diff}/255")
    assert diff <= 1
    repeat = generate(bundle, GenerationParams(LONG, negative="blurry", steps=n, **SIZE), x_T=x_T)
    assert np.abs(pixels(repeat) - pixels(ours)).max() > 2  # the two choices make different images


def test_contexts_repeat_to_a_limit(bundle):
    five = " ".join(["photo"] * 370)  # 5 chunks; with a 4-chunk negative "repeat" would need 20
    four = " ".join(["photo"] * 290)
    with pytest.raises(PromptError, match="repeat to a common 20 chunks"):
        generate(bundle, GenerationParams(five, negative=four, steps=1, **SIZE))
    generate(bundle, GenerationParams(five, negative=four, steps=1, chunk_padding="empty", **SIZE))


# ---------------------------------------------------------------------------------------------------- GBSD


def test_gbsd_across_chunk_counts(bundle):
    """A 2-chunk global prompt with a 1-chunk local one: α = 0 at layout fraction 0 is the local prompt alone (repeated, which
    attention does not see), α = 1 the global prompt alone; the mix is of the weighted, mean-restored embeddings."""
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def run(**kw):
        return pixels(generate(bundle, GenerationParams(**{"prompt": LONG, "steps": 6, **SIZE, **kw}), x_T=x_T))

    assert np.abs(run(focus=FOCUS, alpha=0.0, layout=0.0) - run(prompt=FOCUS)).max() <= 1
    assert np.array_equal(run(focus=FOCUS, alpha=1.0, layout=0.5), run())
    # α·E(global) + (1−α)·E(local) on weighted embeddings: against the stages built by hand from conditioning()
    p = GenerationParams(LONG, focus="(a carrot:1.4)", alpha=0.4, layout=0.5, steps=6, **SIZE)
    g, loc, neg = (bundle.conditioning(t, (64, 64), negative=t == "").context for t in (LONG, p.focus, ""))
    sampler = model_ddim(bundle)
    stages = gbsd_stages(g, 0.4 * g + 0.6 * loc.repeat(1, 2, 1), 6, 0.5)
    with torch.inference_mode():
        *_, last = denoise(CFGStep(bundle.unet, sampler, 7.5), sampler.start_latents(x_T), sampler.timesteps(6),
                           stages, neg.repeat(1, 2, 1))
    by_hand = np.asarray(bundle.decode_latents(last.latents)[0], dtype=np.int16)
    assert np.array_equal(pixels(generate(bundle, p, x_T=x_T)), by_hand)
    assert np.abs(run(focus="a carrot", alpha=0.4, layout=0.5) - by_hand).max() > 2  # the weight matters


def test_sweep_equals_independent_runs_with_long_and_weighted_prompts(bundle):
    p = GenerationParams(LONG, negative="blurry, (lowres:1.2)", layout=0.5, steps=6, seed=5, **SIZE)
    focus = ["(a carrot:1.3)", LONGER]
    results = sweep(bundle, p, alphas=[0.2, 0.7], focus_prompts=focus)
    for r in results:
        single = generate(bundle, GenerationParams(LONG, negative=p.negative, focus=r.params.focus, alpha=r.params.alpha,
                                                   layout=0.5, steps=6, seed=5, **SIZE))
        assert np.abs(pixels(r) - pixels(single)).max() <= 1  # batched vs batch-1 matmuls: <= 1/255


def test_fast_path_runs_long_contexts(bundle, responsive_ckpt):
    """The fast step (fused QKV, K/V cached per stage over the 77·k positions) with a 3-chunk run context."""
    p = GenerationParams(LONGER, focus=FOCUS, negative=LONG, alpha=0.3, layout=0.5, steps=6, seed=2, **SIZE)
    fast = fast_generate(gbsd_core.load(responsive_ckpt), p,
                         FastOptions(cache_context_kv=True, fuse_qkv=True, channels_last=True))
    diff = np.abs(pixels(fast) - pixels(generate(bundle, p))).max()
    print(f"fast path, 6-chunk context (LCM of 3 and 2): max pixel diff {diff}/255 vs plain")
    assert diff <= 1


# ------------------------------------------------------------------------------------------------ prompt editing


def test_prompt_editing_is_a_stage_list(bundle):
    """[from:to:when] runs as a list of `Stage`s: `from` for steps 0..when (A1111: the first text whose end step is
    >= the step), `to` after; with GBSD, the focus stage splits the same way."""
    n = 8
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    sampler = model_ddim(bundle)

    def by_hand(stages, negative):
        with torch.inference_mode():
            *_, last = denoise(CFGStep(bundle.unet, sampler, 7.5), sampler.start_latents(x_T), sampler.timesteps(n),
                               stages, negative)
        return np.asarray(bundle.decode_latents(last.latents)[0], dtype=np.int16)

    e = {t: bundle.conditioning(t, (64, 64)).context for t in ("a bunny in a garden", "a carrot in a garden",
                                                                "a carrot", "a bunny", "")}
    ours = generate(bundle, GenerationParams("a [bunny:carrot:3] in a garden", steps=n, **SIZE), x_T=x_T)
    expected = by_hand([Stage("global", range(0, 4), e["a bunny in a garden"]),
                        Stage("global", range(4, n), e["a carrot in a garden"])], e[""])
    assert np.array_equal(pixels(ours), expected)
    gbsd = generate(bundle, GenerationParams("a [bunny:carrot:0.25] in a garden", focus="a [carrot:bunny:6]",
                                             alpha=0.5, layout=0.5, steps=n, **SIZE), x_T=x_T)
    mix = focus_conditioning
    expected = by_hand([Stage("layout", range(0, 3), e["a bunny in a garden"]),
                        Stage("layout", range(3, 4), e["a carrot in a garden"]),
                        Stage("focus", range(4, 7), mix(e["a carrot in a garden"], e["a carrot"], 0.5)),
                        Stage("focus", range(7, 8), mix(e["a carrot in a garden"], e["a bunny"], 0.5))], e[""])
    assert np.array_equal(pixels(gbsd), expected)
    assert layout_steps(n, 0.5) == 4


# ------------------------------------------------------------------------------------------------ LoRA tags


def test_a_lora_tag_reaching_the_pipeline_is_refused_not_dropped(bundle):
    """The parser takes <lora:...> tags out of the text, but the pipeline applies no LoRA (gbsd_core.lora does, the
    command line hands the tags over): a run given a prompt as typed would silently lack its LoRA."""
    for params, where in ((GenerationParams("a cat <lora:style:0.8>", steps=2, **SIZE), "prompt"),
                          (GenerationParams("a cat", focus="a [cat] <lyco:x>", steps=2, **SIZE), "focus"),
                          (GenerationParams("a cat", focus="a cat", focus_to="a dog <lora:x:1>", steps=2, **SIZE),
                           "focus")):
        with pytest.raises(PromptError, match=f"{where}: <(lora|lyco):.*> is a LoRA tag, which the pipeline does not"):
            generate(bundle, params)
    with pytest.raises(PromptError, match="is a LoRA tag"):
        sweep(bundle, GenerationParams("a cat", focus="a cat", steps=2, **SIZE), focus_prompts=["a <lora:x:1> dog"])
    with pytest.raises(PromptError, match="is a LoRA tag"):
        bundle.conditioning("a cat <lora:style:0.8>", (64, 64))
