"""Full-size LoRA parity (-m fullsize; run under the heavy lock): the SD1.5 UNet with a rank-32 kohya LoRA on every
attention layer and every conv, merged by gbsd, against diffusers' UNet2DConditionModel with the same file loaded
through the pipeline's own path (`lora_state_dict` -> `load_lora_into_unet`) and fused (`fuse_lora`)."""
from __future__ import annotations

import gc

import pytest
import torch
from _lora import kohya_state_dict, write
from _reference import diffusers_unet
from _util import rel_err

from gbsd_core.bundle import SDBundle
from gbsd_core.family import SD1
from gbsd_core.lora import apply_loras, load_lora
from gbsd_core.unet import UNetConfig, UNetModel

RANK, ALPHA, SCALE = 32, 16.0, 0.8


@pytest.mark.fullsize
def test_fullsize_sd15_unet_rank32_lora_equals_diffusers_fused(tmp_path):
    from _fullsize import fill_from_pool_, peak_rss_gb, reset_peak_rss
    from diffusers import StableDiffusionPipeline

    reset_peak_rss()
    with torch.device("meta"):
        ours = UNetModel(UNetConfig()).eval()
    fill_from_pool_(ours.to_empty(device="cpu"), seed=0)
    ref = diffusers_unet(ours)  # its own copy: gbsd merges into ours in place
    # every attention layer (q, k, v, out, the GEGLU MLP, proj_in/out) and every conv, by diffusers' names (kohya's
    # spelling for SD1); std chosen so that ΔW is a visible fraction of W
    targets = [(n, tuple(m.weight.shape)) for n, m in ref.named_modules()
               if isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.Linear) and ".attentions." in n)]
    sd = kohya_state_dict([("lora_unet_", targets)], seed=3, rank=RANK, alpha=ALPHA, std=0.04)
    path = write(sd, tmp_path / "rank32.safetensors")
    converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(sd))
    StableDiffusionPipeline.load_lora_into_unet(converted, alphas, unet=ref, adapter_name="r32")
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = sum(isinstance(m, BaseTunerLayer) for m in ref.modules())
    ref.fuse_lora(lora_scale=SCALE, adapter_names=["r32"])
    bundle = SDBundle(unet=ours, vae=None, text_encoder=None, tokenizer=None, family=SD1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([981, 1])
    ctx = torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        plain = ours(x, t, ctx)
        with apply_loras(bundle, [(load_lora(path), SCALE)]) as applied:
            merged = ours(x, t, ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    err, effect = rel_err(merged, theirs), rel_err(plain, theirs)
    peak = peak_rss_gb()
    print(f"full-size SD1.5 UNet, rank-{RANK} LoRA on {len(targets)} attention layers and convs: rel err vs diffusers "
          f"fused {err:.2e} (without the LoRA {effect:.2e}); layers adapted: diffusers {adapted}, gbsd "
          f"{applied.report.modules}; peak RSS {peak:.1f} GB")
    del ours, ref, bundle
    gc.collect()
    assert err <= 1e-5 and effect > 1e-2
    assert adapted == applied.report.modules == len(targets)
    assert peak <= 20.0
