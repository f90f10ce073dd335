"""The one diffusers -> original name table (gbsd_core/diffusers_layout.py): it maps every diffusers key of the
fixtures onto the original keys, and inverts diffusers' own converters."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import TOL, randomize_, save_tiny_pipe, tokens
from _util import CONFIGS, GOLDEN, LDM_KEYS, meta_state_dict, read_keys_tsv, rel_err
from safetensors.torch import load_file, save_file

from gbsd_core import diffusers_configs as dc
from gbsd_core import diffusers_layout as dl
from gbsd_core.bundle import SDBundle
from gbsd_core.clip_text import CLIPTextConfig
from gbsd_core.family import SD1, SD2_768_V
from gbsd_core.loading import (
    PREFIXES,
    CheckpointError,
    load,
    read_state_dict,
    save_single_file,
)
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.unet import UNetConfig
from gbsd_core.vae import VAEConfig


# ------------------------------------------------------------------------------------------ diffusers table
def _diffusers_rows(component: str) -> dict[str, torch.Tensor]:
    rows = read_keys_tsv(LDM_KEYS / "diffusers_layout" / f"{component}.tsv")
    return meta_state_dict(rows)


PLANS = {"unet": dl.unet_plan, "vae": dl.vae_plan, "text_encoder": dl.clip_plan}


@pytest.mark.parametrize("component", list(PLANS))
def test_diffusers_table_maps_onto_original_keys(component: str) -> None:
    sd = _diffusers_rows(component)
    ours = dl.apply_plan(PLANS[component](list(sd)), sd)
    golden = read_keys_tsv(LDM_KEYS / GOLDEN["sd1"])
    prefix = PREFIXES[component]
    want = {k[len(prefix):]: v[0] for k, v in golden.items() if k.startswith(prefix) and v[2] is None}
    got = {k: tuple(t.shape) for k, t in ours.items()}
    print(f"{component}: {len(sd)} diffusers keys -> {len(got)} original keys")
    assert got == want  # names and shapes, the VAE's Linear [512, 512] -> conv [512, 512, 1, 1] included


def _tagged(rows: dict) -> dict[str, torch.Tensor]:
    """One distinct constant per key, as zero-memory expanded views: a mapping that sends a key to another key of
    the same shape (e.g. two ResBlocks swapped) shows up as a wrong tag."""
    return {k: torch.full((1,) * len(shape), float(i)).expand(shape)
            for i, (k, (shape, _, opt)) in enumerate(sorted(rows.items())) if opt is None}


@pytest.mark.parametrize("component", list(PLANS))
def test_diffusers_table_inverts_diffusers_converter(component: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    golden = read_keys_tsv(LDM_KEYS / GOLDEN["sd1"])
    prefix = PREFIXES[component]
    original = _tagged({k: v for k, v in golden.items() if k.startswith(prefix)})
    if component == "unet":
        theirs = convert_ldm_unet_checkpoint(original, json.loads((CONFIGS / "unet" / "config.json").read_text()))
    elif component == "vae":
        theirs = convert_ldm_vae_checkpoint(original, json.loads((CONFIGS / "vae" / "config.json").read_text()))
    else:
        theirs = convert_ldm_clip_checkpoint(original)
    assert set(theirs) == set(_diffusers_rows(component)) - {"text_model.embeddings.position_ids"}
    back = dl.apply_plan(PLANS[component](list(theirs)), theirs)
    assert set(back) == {k[len(prefix):] for k in original}
    def tag(t: torch.Tensor) -> float:
        return float(t[(0,) * t.ndim])  # constant tensors: one element is the tag

    bad = [k for k in back if back[k].shape != original[prefix + k].shape or tag(back[k]) != tag(original[prefix + k])]
    assert not bad, f"{len(bad)} keys get another key's tensor, e.g. {bad[:5]}"


def test_openclip_table_inverts_diffusers_converter() -> None:
    """SD2's text encoder: diffusers' convert_open_clip_checkpoint (splits the fused in_proj, drops the last block for
    real ViT-H) then our table must give back every tensor exactly, q/k/v order included. Tiny real tensors."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    cfg = OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=32)
    g = torch.Generator().manual_seed(0)
    original = {"cond_stage_model." + k: torch.randn(t.shape, generator=g)
                for k, t in OpenCLIPTextEncoder(cfg).state_dict().items()}
    theirs = convert_open_clip_checkpoint(None, original)
    # diffusers keeps 23 of ViT-H's 24 blocks; do the same to the tiny tower and drop what a CLIPTextModel lacks
    theirs = {k: v for k, v in theirs.items() if not k.startswith("text_model.encoder.layers.2.")
              and k != "text_projection.weight"}
    back = dl.apply_plan(dl.openclip_plan(list(theirs)), theirs)
    expected = {k.removeprefix("cond_stage_model."): t for k, t in original.items()
                if not re.search(r"resblocks\.2\.|text_projection|logit_scale", k)}
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl-base", "sdxl-refiner"])
def test_unet_names_backwards_name_diffusers_own_modules(arch: str) -> None:
    """unet_diffusers_names (the table read backwards, for LoRA lookups by either spelling) gives every Linear and
    Conv2d of our UNet the name of diffusers' own module holding the same weight (the twin is filled by diffusers'
    convert_ldm_unet_checkpoint), and names each diffusers module exactly once."""
    from _reference import diffusers_unet
    from _sdxl import tiny_sdxl_modules
    from _tiny import tiny_modules

    unet = (tiny_modules(sd2=arch == "sd2")["unet"] if arch in ("sd1", "sd2")
            else tiny_sdxl_modules(refiner=arch == "sdxl-refiner")["unet"])
    ref = diffusers_unet(unet)
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    ours = {n: m for n, m in unet.named_modules() if isinstance(m, layers)}
    theirs = {n: m for n, m in ref.named_modules() if isinstance(m, layers)}
    names = dl.unet_diffusers_names(list(ours), unet.config.num_res_blocks)
    print(f"{arch}: {len(ours)} layers named, {len(theirs)} in diffusers' UNet")
    assert set(names) == set(ours) and sorted(names.values()) == sorted(theirs)
    for name, diffusers_name in names.items():
        mine, other = ours[name].weight, theirs[diffusers_name].weight
        assert torch.equal(mine, other.reshape(mine.shape)), (name, diffusers_name)


# ------------------------------------------------------------------------------------------------ diffusers folders
def _diffusers_models(sd2: bool, wide: bool = False):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128) if sd2 or wide else (32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,  # the text encoder's width: the parts must fit together
        # diffusers' misnomer: attention_head_dim is the head *count* (SD1: 8, read from the config since no shape
        # holds it; SD2 and `wide`: channels // 64 per level, what shape inference assumes)
        attention_head_dim=(1, 2) if sd2 or wide else 8,
        use_linear_projection=sd2, norm_num_groups=32,
    )
    vae = DAutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )
    text = CLIPTextModel(HFCLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
    ))
    return {"unet": randomize_(unet, 10), "vae": randomize_(vae, 11), "text_encoder": randomize_(text, 12)}


def _save_diffusers_folder(models: dict, folder: Path, prediction_type: str) -> Path:
    from _reference import DDIM_CONFIG
    from diffusers import DDIMScheduler

    for name, m in models.items():
        m.save_pretrained(folder / name)
    # SD's schedule, as SD folders ship it (DDIMScheduler's own defaults are the original DDPM's, with x̂_0 clipping)
    DDIMScheduler(**DDIM_CONFIG, prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@torch.no_grad()
def _compare_with_diffusers(b: SDBundle, ref: dict, context_dim: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    t = torch.tensor([10, 900])
    pairs = {
        "unet": (b.unet(x, t, ctx), ref["unet"](x, t, encoder_hidden_states=ctx).sample),
        "vae.decode": (b.vae.decode(x[:1]), ref["vae"].decode(x[:1]).sample),
        "vae.encode": (b.vae.encode(img).mean, ref["vae"].encode(img).latent_dist.mean),
        "text": (b.text_encoder(tokens()), ref["text_encoder"](tokens()).last_hidden_state),
    }
    for name, (ours, theirs) in pairs.items():
        err = rel_err(ours, theirs)
        print(f"diffusers folder {b.family.name} {name}: rel_err {err:.1e}")
        assert ours.shape == theirs.shape and err <= TOL, name


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1", "sd2-v"])
def test_diffusers_folder_matches_diffusers(tmp_path: Path, sd2: bool) -> None:
    ref = _diffusers_models(sd2)
    folder = _save_diffusers_folder(ref, tmp_path / "pipe", "v_prediction" if sd2 else "epsilon")
    b = load(folder)
    assert b.family is (SD2_768_V if sd2 else SD1)
    if sd2:  # the 2-layer HF tower already ends where SD2 reads: all of it runs, no projection
        assert isinstance(b.text_encoder, OpenCLIPTextEncoder)
        assert not b.text_encoder.config.penultimate and not b.text_encoder.config.has_projection
        with pytest.raises(ValueError, match="cannot represent it"):
            save_single_file(b, tmp_path / "x.safetensors")
    _compare_with_diffusers(b, ref, 128)


def test_diffusers_folder_variants(tmp_path: Path) -> None:
    """Old-diffusers VAE attention names (query/key/value/proj_attn), fp16 file names, .bin files, a text encoder
    saved with the `text_model.` level (transformers < 5): all load to the same weights."""
    ref = _diffusers_models(sd2=False)
    folder = _save_diffusers_folder(ref, tmp_path / "pipe", "epsilon")
    base = read_state_dict(folder)

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_sd = load_file(str(vae_file))
    renamed = {}
    for k, v in vae_sd.items():
        for new, legacy in old.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        renamed[k] = v
    assert sum(".query." in k for k in renamed) == 4  # encoder + decoder, weight + bias
    vae_file.unlink()
    save_file(renamed, str(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors"))

    te_file = folder / "text_encoder" / "model.safetensors"
    te_sd = load_file(str(te_file))
    te_file.unlink()
    torch.save({"text_model." + k: v for k, v in te_sd.items()}, folder / "text_encoder" / "pytorch_model.bin")

    variant = read_state_dict(folder)
    assert base.keys() == variant.keys()
    for k in base:
        assert torch.equal(base[k], variant[k]), k
    _compare_with_diffusers(load(folder), ref, 128)


def test_diffusers_folder_missing_part(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="no unet/ weights"):
        load(tmp_path)


def test_diffusers_folder_without_configs_is_read_by_shapes(tmp_path: Path) -> None:
    """No config.json anywhere (some hand-made folders): the shapes decide, as for single files."""
    ref = _diffusers_models(sd2=False, wide=True)
    folder = _save_diffusers_folder(ref, tmp_path / "pipe", "epsilon")
    for f in folder.glob("*/config.json"):
        f.unlink()
    _compare_with_diffusers(load(folder), ref, 128)


# ------------------------------------------------------------------------------ diffusers folders read by configs
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipe(tmp_path_factory.mktemp("tiny-pipe") / "tiny-stable-diffusion-pipe")


def test_tiny_pipe_configs_are_read_per_component(tiny_pipe: Path) -> None:
    """Each component's config.json decides what shapes cannot say: 8 heads on 32/64 channels (head widths 4 and 8),
    a text encoder of 4 heads of 8 with an MLP of 37, a 2-level VAE (factor 2) with SD's scaling factor."""
    cfg = {name: json.loads((tiny_pipe / name / "config.json").read_text()) for name in ("unet", "vae", "text_encoder")}
    assert dc.unet_config(cfg["unet"]) == UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,), num_heads=8,
        context_dim=32)
    assert dc.vae_config(cfg["vae"]) == VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.18215)
    assert dc.text_encoder_config(cfg["text_encoder"]) == CLIPTextConfig(
        vocab_size=49408, width=32, layers=5, heads=4, context_length=77, mlp_ratio=37 / 32)
    b = load(tiny_pipe)
    assert b.family.name == "sd1" and b.text_encoder.config.heads == 4
    assert b.text_encoder.transformer.text_model.encoder.layers[0].mlp.fc1.out_features == 37
    limits = b.limits()
    assert (limits.vae_factor, limits.latent_channels, limits.native_size) == (2, 4, 64)  # sample_size 32 x 2


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


@pytest.mark.parametrize("focus", [None, "a carrot"], ids=["plain", "gbsd"])
def test_tiny_pipe_generates_what_diffusers_generates(tiny_pipe: Path, focus: str | None) -> None:
    """gbsd on the folder against diffusers' own StableDiffusionPipeline.from_pretrained on the same folder (CompVis
    DDIM, the scheduler config it holds): the same image within 1/255, at the folder's native 64x64 (a 32x32 latent:
    the VAE downsamples by 2, not 8). GBSD switches the embeddings at the stage boundary, in diffusers by a callback."""
    from diffusers import StableDiffusionPipeline

    from gbsd_core.pipeline import GenerationParams, generate
    from gbsd_core.sampling import layout_steps

    prompt, n, alpha, layout = "a bunny and a carrot in a garden, bokeh", 10, 0.3, 0.6
    b = load(tiny_pipe)
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipe, local_files_only=True, safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = generate(b, GenerationParams(prompt, focus=focus, alpha=alpha, layout=layout, steps=n, cfg=7.5), x_T=x_T)
    assert ours.image.size == (64, 64)
    callback = None
    if focus is not None:
        g, neg = ref.encode_prompt(prompt, "cpu", 1, True, "")
        loc, _ = ref.encode_prompt(focus, "cpu", 1, True, "")
        n_layout = layout_steps(n, layout)

        def callback(pipe, i, t, kwargs):
            return {"prompt_embeds": torch.cat([neg, alpha * g + (1 - alpha) * loc])} if i == n_layout - 1 else {}
    theirs = ref(prompt, negative_prompt="", num_inference_steps=n, guidance_scale=7.5, eta=0.0, latents=x_T.clone(),
                 output_type="np", callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"]).images[0]
    assert theirs.shape == (64, 64, 3)  # diffusers' default size for the folder: sample_size x its VAE factor
    assert 0.2 < np.mean((theirs > 0.02) & (theirs < 0.98)), "saturated reference: the comparison would be empty"
    diff = float(np.abs(_pixels(ours.image) - theirs).max())
    print(f"tiny-pipe-shaped folder, {focus or 'plain SD'}: max pixel diff {diff * 255:.3f}/255 vs diffusers")
    assert diff <= 1 / 255
