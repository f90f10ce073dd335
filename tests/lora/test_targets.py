"""The lookup (gbsd_core/lora/targets.py): every weight under each spelling a file may use, the text parts each
family has (the SDXL refiner: bigG alone), bigG's text_projection as a transposed Linear, and the lookup of a model
inspected on the meta device equal to the loaded model's."""
from __future__ import annotations

import pytest
import torch
from _lora import kohya_state_dict, write
from _sdxl import tiny_sdxl_modules
from _tiny import tiny_modules
from _util import rel_err

from gbsd_core.bundle import SDBundle
from gbsd_core.family import SDXL_BASE, SDXL_REFINER
from gbsd_core.lora import apply_loras, load_lora, lora_targets, lora_targets_of_configs


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl-base", "sdxl-refiner"])
def test_every_weight_is_listed_under_both_unet_spellings_and_the_text_names(arch):
    modules = (tiny_modules(sd2=arch == "sd2") if arch in ("sd1", "sd2")
               else tiny_sdxl_modules(refiner=arch == "sdxl-refiner"))
    unet, text = modules["unet"], modules["text_encoder"]
    t = lora_targets(unet, text)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    unet_entries = [(k, v) for k, v in t.by_name.items() if k[0] == "unet"]
    assert len(unet_entries) == 2 * len(layers)  # the original and the diffusers name of each
    assert {v.param for _, v in unet_entries} == {f"{n}.weight" for n in layers}
    expected_parts = {"sd1": {"unet", "te", "text_encoder"}, "sd2": {"unet", "te", "text_encoder"},
                      "sdxl-base": {"unet", "te1", "text_encoder", "te2", "text_encoder_2"},
                      "sdxl-refiner": {"unet", "te2", "text_encoder_2"}}[arch]
    assert t.parts == expected_parts
    q = [k for k in t.by_name if k[1] == "text_model_encoder_layers_0_self_attn_q_proj"]
    assert sorted(p for p, _ in q) == sorted(expected_parts - {"unet"})
    if arch in ("sd2", "sdxl-refiner"):  # OpenCLIP: q is the first third of the fused in_proj rows
        target = t.get("te" if arch == "sd2" else "te2", "text_model_encoder_layers_0_self_attn_q_proj")
        width = target.shape[0]
        assert target.param.endswith("resblocks.0.attn.in_proj_weight") and target.rows == (0, width)
    meta = lora_targets_of_configs(unet.config, text.config)  # a checkpoint's configs: the same lookup, no weights
    assert meta.by_name == t.by_name and meta.parts == t.parts


def test_bigg_text_projection_is_a_transposed_linear(tmp_path):
    """HF's CLIPTextModelWithProjection keeps the projection as a Linear [embed, width]; OpenCLIP's text_projection
    is [width, embed], applied as x @ P: a LoRA's ΔW lands transposed (and moves the pooled vector)."""
    modules = tiny_sdxl_modules()
    bundle = SDBundle(unet=modules["unet"], vae=None, text_encoder=modules["text_encoder"], tokenizer=None,
                      family=SDXL_BASE)
    proj = modules["text_encoder"].embedders[1].model.text_projection  # [128, 32]
    sd = kohya_state_dict([("lora_te2_", [("text_projection", (32, 128))])])
    before = proj.detach().clone()
    with apply_loras(bundle, [(load_lora(write(sd, tmp_path / "p.safetensors")), 0.9)]):
        merged = proj.detach().clone()
    hand = before + (0.9 * 0.5 * sd["lora_te2_text_projection.lora_up.weight"]
                     @ sd["lora_te2_text_projection.lora_down.weight"]).t()
    assert rel_err(merged, hand) <= 1e-6 and torch.equal(proj, before)


def test_a_base_lora_with_clip_l_modules_is_refused_by_the_refiner(tmp_path):
    modules = tiny_sdxl_modules(refiner=True)
    bundle = SDBundle(unet=modules["unet"], vae=None, text_encoder=modules["text_encoder"], tokenizer=None,
                      family=SDXL_REFINER)
    sd = kohya_state_dict([("lora_te1_", [("text_model.encoder.layers.0.self_attn.q_proj", (64, 64))])])
    with pytest.raises(ValueError, match=r"has modules for SDXL's CLIP-L \(lora_te1_\), which this model does not have "
                                         r"\(it has SDXL's bigG \(lora_te2_\)\)"):
        apply_loras(bundle, [(load_lora(write(sd, tmp_path / "base.safetensors")), 1.0)])
