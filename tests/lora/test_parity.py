"""LoRA parity with diffusers (gbsd_core/lora): synthetic kohya files and diffusers-format files on the tiny SD1 and
SDXL pipelines give the image diffusers' `load_lora_weights` pipeline gives (PEFT adapters at runtime), within 1/255,
and gbsd merges as many layers as diffusers adapted (diffusers only warns about keys it cannot place). SD2's OpenCLIP
q/k/v row slices are checked against a hand merge and against transformers' tower with PEFT's adapters."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _lora import ALPHA, RANK, adapted, hf_text_layers, kohya_state_dict, layers, write
from _reference import diffusers_sd_pipeline, diffusers_sdxl_pipeline
from _util import max_pixel_diff, rel_err

import gbsd_core
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.pipeline import GenerationParams, generate

PROMPT = "a bunny and a carrot in a garden, bokeh"
SIZE = dict(width=64, height=64)
SCALE = 0.7  # the user's scale, != 1


@pytest.fixture(scope="module")
def sd1(responsive_ckpt, tmp_path_factory):
    bundle = gbsd_core.load(responsive_ckpt)
    pipe = diffusers_sd_pipeline(bundle, tmp_path_factory.mktemp("sd1-pipe"))
    pipe.set_progress_bar_config(disable=True)
    return bundle, pipe


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_ckpt, tmp_path_factory):
    bundle = gbsd_core.load(tiny_sdxl_ckpt)
    pipe = diffusers_sdxl_pipeline(bundle, tmp_path_factory.mktemp("sdxl-pipe"))
    pipe.set_progress_bar_config(disable=True)
    return bundle, pipe


def _kohya(bundle, pipe) -> dict[str, torch.Tensor]:
    """Every Linear and Conv2d of the UNet (attention, 1x1 and 3x3 convs, time embeddings) and every attention and MLP
    layer of each text tower, named as kohya does: SD1 by diffusers' own module names, SDXL by sgm's (our
    checkpoint's names), text towers by transformers' names."""
    if hasattr(pipe, "text_encoder_2"):
        groups = [("lora_unet_", layers(bundle.unet)), ("lora_te1_", hf_text_layers(pipe.text_encoder)),
                  ("lora_te2_", hf_text_layers(pipe.text_encoder_2))]
    else:
        groups = [("lora_unet_", layers(pipe.unet)), ("lora_te_", hf_text_layers(pipe.text_encoder))]
    return kohya_state_dict(groups, seed=1)


def _diffusers_file(pipe, sd: dict[str, torch.Tensor], path):
    """The same adapter in diffusers' own format: loaded by diffusers from the kohya dict, written by its
    save_lora_weights with the adapter configs as `lora_adapter_metadata` (lora_alpha 2, r 4)."""
    from peft.utils import get_peft_model_state_dict

    pipe.load_lora_weights(dict(sd), adapter_name="export")
    towers = [("text_encoder", pipe.text_encoder)] + ([("text_encoder_2", pipe.text_encoder_2)]
                                                       if hasattr(pipe, "text_encoder_2") else [])
    kwargs = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name="export"),
              "unet_lora_adapter_metadata": pipe.unet.peft_config["export"].to_dict()}
    for name, tower in towers:
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(tower, adapter_name="export")
        kwargs[f"{name}_lora_adapter_metadata"] = tower.peft_config["export"].to_dict()
    pipe.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    pipe.unload_lora_weights()
    return path


def _reference(pipe, sd, x_T) -> tuple[np.ndarray, int]:
    """diffusers' image with the LoRA loaded at SCALE, and how many layers it adapted."""
    pipe.load_lora_weights(dict(sd), adapter_name="under_test")
    pipe.set_adapters(["under_test"], [SCALE])
    towers = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    count = adapted(*towers)
    extra = {"negative_prompt": None} if hasattr(pipe, "text_encoder_2") else {"negative_prompt": ""}
    try:
        image = pipe(PROMPT, num_inference_steps=6, guidance_scale=7.5, eta=0.0, latents=x_T.clone(),
                     output_type="np", **extra, **SIZE).images[0]
    finally:
        pipe.unload_lora_weights()
    return image, count


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lora_image_equals_diffusers_load_lora_weights(family, fmt, request, tmp_path):
    bundle, pipe = request.getfixturevalue(family)
    sd = _kohya(bundle, pipe)
    path = write(sd, tmp_path / "k.safetensors") if fmt == "kohya" else _diffusers_file(pipe, sd, tmp_path / "d.safetensors")
    lora = load_lora(path)
    assert lora.format == fmt
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(21))
    params = GenerationParams(PROMPT, steps=6, cfg=7.5, **SIZE)
    theirs, count = _reference(pipe, sd, x_T)
    with apply_loras(bundle, [(lora, SCALE)]) as applied:
        ours = np.asarray(generate(bundle, params, x_T=x_T).image)
    plain = np.asarray(generate(bundle, params, x_T=x_T).image)
    diff = max_pixel_diff(ours, theirs)
    print(f"{family} {fmt} LoRA (rank {RANK}, alpha {ALPHA:g}, scale {SCALE}): max pixel diff {diff * 255:.3f}/255 vs "
          f"diffusers; layers adapted: diffusers {count}, gbsd {applied.report.modules}")
    assert diff <= 1 / 255
    assert applied.report.modules == count == len(lora.modules) > 100
    assert max_pixel_diff(plain, theirs) > 2 / 255  # the LoRA changes the image: the comparison can fail


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    from _tiny import tiny_modules

    from gbsd_core.loading import save_single_file

    path = save_single_file(tiny_modules(sd2=True, seed=3), tmp_path_factory.mktemp("sd2") / "tiny-sd2.safetensors")
    return gbsd_core.load(path, family="sd2-512")


def test_sd2_openclip_qkv_are_row_slices_of_in_proj(sd2, tmp_path):
    """SD2's OpenCLIP tower fuses q/k/v into attn.in_proj_weight ([W_q; W_k; W_v]); kohya files name them as HF
    CLIP's q_proj/k_proj/v_proj. The merge equals a hand merge into the rows [0:d], [d:2d], [2d:3d], and the merged
    tower equals transformers' CLIP tower (diffusers' conversion of the same weights) with PEFT's adapters loaded
    by diffusers from the same file."""
    from _reference import diffusers_sd_pipeline
    from _tiny import tokens

    enc = sd2.text_encoder
    pipe = diffusers_sd_pipeline(sd2, tmp_path / "pipe")
    sd = kohya_state_dict([("lora_te_", hf_text_layers(pipe.text_encoder))], seed=2, std=0.3)
    lora = load_lora(write(sd, tmp_path / "sd2-te.safetensors"))
    d = enc.config.width
    before = enc.model.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    with apply_loras(sd2, [(lora, SCALE)]):
        merged = enc.model.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
        ours = enc(tokens())
    hand = before.clone()
    for i, which in enumerate("qkv"):
        key = f"lora_te_text_model_encoder_layers_0_self_attn_{which}_proj"
        up, down = sd[f"{key}.lora_up.weight"], sd[f"{key}.lora_down.weight"]
        hand[i * d:(i + 1) * d] += SCALE * (ALPHA / RANK) * up @ down
    assert rel_err(merged, hand) <= 1e-6 and rel_err(merged, before) > 1e-3
    assert torch.equal(enc.model.transformer.resblocks[0].attn.in_proj_weight, before)  # restored exactly
    pipe.load_lora_weights(dict(sd), adapter_name="te")
    pipe.set_adapters(["te"], [SCALE])
    with torch.no_grad():  # diffusers' SD2 tower holds the first L-1 blocks: its last state is SD2's penultimate one
        theirs = pipe.text_encoder(tokens()).last_hidden_state
    err = rel_err(ours, theirs)
    print(f"SD2 OpenCLIP tower with a te LoRA vs transformers + PEFT: rel err {err:.1e}, {adapted(pipe.text_encoder)} "
          f"layers adapted there, {len(lora.modules)} in the file")
    assert err <= 1e-5 and adapted(pipe.text_encoder) == len(lora.modules)
    assert rel_err(enc(tokens()), theirs) > 1e-3  # the LoRA changes the embedding
