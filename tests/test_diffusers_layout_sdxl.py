"""SDXL diffusers folders (unet/, vae/, text_encoder/ = CLIPTextModel, text_encoder_2/ = CLIPTextModelWithProjection;
the refiner: text_encoder_2/ alone) mapped into sgm's names by diffusers_layout's one table, each config.json read by
diffusers_configs: the golden diffusers key lists map onto the golden original ones, the table inverts diffusers' own
converters, the released configs give the released architectures, and tiny folders written by diffusers' own
save_pretrained load in gbsd and generate what StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline generate
on the same folder."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _sdxl import save_tiny_sdxl_pipe
from _util import LDM_KEYS, max_pixel_diff, meta_state_dict, read_keys_tsv
from PIL import Image
from safetensors.torch import load_file, save_file

from gbsd_core import diffusers_configs as dc
from gbsd_core import diffusers_layout as dl
from gbsd_core.clip_text import CLIPTextConfig
from gbsd_core.family import SDXL_BASE, SDXL_REFINER
from gbsd_core.loading import PREFIXES, SDXL_PREFIXES, load, read_state_dict
from gbsd_core.openclip_text import OpenCLIPTextEncoder
from gbsd_core.pipeline import GenerationParams, generate
from gbsd_core.sampling import layout_steps
from gbsd_core.sdxl_conditioner import BIGG
from gbsd_core.unet import UNetConfig

SDXL_KEYS = LDM_KEYS / "diffusers_layout_sdxl"
PROMPT, FOCUS = "a bunny and a carrot in a garden, bokeh", "a carrot"


# ------------------------------------------------------------------------------------------ the table, full size
def _golden_part(tsv: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k: v[0] for k, v in read_keys_tsv(LDM_KEYS / tsv).items() if k.startswith(prefix) and v[2] is None}


@pytest.mark.parametrize("folder, file", [
    ("unet", "unet.tsv"), ("vae", "vae.tsv"), ("text_encoder", "text_encoder.tsv"),
    ("text_encoder", "text_encoder.text_model_layout.tsv"), ("text_encoder_2", "text_encoder_2.tsv"),
])
def test_sdxl_diffusers_keys_map_onto_the_sgm_keys(folder: str, file: str) -> None:
    """Every diffusers key of SDXL base (both CLIPTextModel layouts: transformers 5's flat names and 4.x's
    `text_model.` + position_ids) lands on the golden sgm key of the same shape; nothing is left over or missing but
    bigG's `logit_scale`, which no diffusers folder has."""
    part = dl.SDXL_BASE_PARTS[folder]
    sd = meta_state_dict(read_keys_tsv(SDXL_KEYS / file))
    ours = {part.prefix + k: tuple(t.shape) for k, t in dl.apply_plan(part.plan(sd, None), sd).items()}
    want = _golden_part("sdxl_base.tsv", part.prefix)
    print(f"{folder} ({file}): {len(sd)} diffusers keys -> {len(ours)} sgm keys of {len(want)}")
    assert ours.items() <= want.items()
    assert sorted(want.keys() - ours.keys()) == (["conditioner.embedders.1.model.logit_scale"]
                                                  if folder == "text_encoder_2" else [])


def test_every_part_goes_under_an_original_subtree() -> None:
    for parts, prefixes in ((dl.SD_PARTS, PREFIXES), (dl.SDXL_BASE_PARTS, SDXL_PREFIXES),
                            (dl.SDXL_REFINER_PARTS, SDXL_PREFIXES)):
        for folder, part in parts.items():
            assert part.prefix.startswith(prefixes[folder.removesuffix("_2")]), folder
    assert dl.SDXL_REFINER_PARTS["text_encoder_2"].prefix == "conditioner.embedders.0."  # sgm: bigG is its first
    assert dl.pipeline_parts(lambda f: f != "text_encoder_2") is dl.SD_PARTS
    assert dl.pipeline_parts(lambda f: True) is dl.SDXL_BASE_PARTS
    assert dl.pipeline_parts(lambda f: f != "text_encoder") is dl.SDXL_REFINER_PARTS


def _released_unet_config(refiner: bool) -> dict:
    """The UNet2DConditionModel config of SDXL 1.0 base / refiner, as diffusers' own single-file converter derives it
    from sd_xl_base.yaml / sd_xl_refiner.yaml (fixtures README), built by diffusers on the meta device."""
    from diffusers import UNet2DConditionModel

    if refiner:
        levels = dict(block_out_channels=(384, 768, 1536, 1536), attention_head_dim=(6, 12, 24, 24),
                      transformer_layers_per_block=4, cross_attention_dim=1280,
                      projection_class_embeddings_input_dim=2560,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    else:
        levels = dict(block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                      projection_class_embeddings_input_dim=2816,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=128, layers_per_block=2, use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256, **levels)
    return unet


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_released_configs_give_the_released_architectures(refiner: bool) -> None:
    unet = _released_unet_config(refiner)
    cfg = dc.unet_config(dict(unet.config))
    assert cfg == (UNetConfig.sdxl_refiner() if refiner else UNetConfig.sdxl_base())
    assert dc.unet_sample_size(dict(unet.config)) * 8 == 1024
    # the refiner's 1220 UNet keys (no diffusers list is in the fixtures): diffusers' own module, mapped by the table
    sd = unet.state_dict()
    ours = {"model.diffusion_model." + k: tuple(t.shape) for k, t in dl.apply_plan(dl.unet_plan(list(sd)), sd).items()}
    want = _golden_part("sdxl_refiner.tsv" if refiner else "sdxl_base.tsv", "model.diffusion_model.")
    assert ours == want and len(ours) == (1220 if refiner else 1680)


def test_released_text_encoder_configs() -> None:
    from transformers import CLIPTextConfig as HFCLIPTextConfig

    clip = HFCLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            hidden_act="quick_gelu", projection_dim=768).to_dict()
    bigg = HFCLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                            hidden_act="gelu", projection_dim=1280).to_dict()
    assert dc.clip_l_config(clip) == CLIPTextConfig()
    big = dc.bigg_config(bigg)
    assert big.has_projection and not big.has_logit_scale and big.penultimate
    assert big.__class__(**{**big.__dict__, "has_logit_scale": True}) == BIGG
    with pytest.raises(ValueError, match="quick_gelu"):
        dc.clip_l_config(bigg)
    with pytest.raises(ValueError, match="exact gelu"):
        dc.bigg_config(clip)


@pytest.mark.parametrize("change, needle", [
    (dict(addition_embed_type="image"), "addition_embed_type"),
    (dict(addition_time_embed_dim=0), "addition_time_embed_dim must be an integer >= 1"),  # any width: see below
    (dict(projection_class_embeddings_input_dim=None), "projection_class_embeddings_input_dim"),
    (dict(addition_embed_type=None), "without an addition_embed_type"),
])
def test_added_embedding_options_are_checked(change: dict, needle: str) -> None:
    cfg = {**dict(_released_unet_config(refiner=False).config), **change}
    with pytest.raises(ValueError, match=needle):
        dc.unet_config(cfg)
    other = {**dict(_released_unet_config(refiner=False).config), "addition_time_embed_dim": 8}
    assert dc.unet_config(other) == UNetConfig.sdxl_base() and dc.unet_micro_dim(other) == 8  # y's width: parts fit


def test_bigg_table_inverts_diffusers_converter() -> None:
    """diffusers' convert_open_clip_checkpoint (SDXL's text_encoder_2: splits the fused in_proj, transposes the
    projection into a Linear, drops logit_scale), then our table: every tensor back exactly. Tiny real tensors."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModelWithProjection

    cfg = BIGG.__class__(width=128, layers=3, heads=2, embed_dim=32)
    g = torch.Generator().manual_seed(0)
    original = {"conditioner.embedders.1." + k: torch.randn(t.shape, generator=g)
                for k, t in OpenCLIPTextEncoder(cfg).state_dict().items()}
    with torch.device("meta"):
        ref = CLIPTextModelWithProjection(HFCLIPTextConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                                                           intermediate_size=512, projection_dim=32, hidden_act="gelu"))
    theirs = convert_open_clip_checkpoint(ref, original, prefix="conditioner.embedders.1.model.")
    assert theirs["text_projection.weight"].shape == (32, 128)
    back = dl.apply_plan(dl.openclip_plan(list(theirs)), theirs)
    expected = {k.removeprefix("conditioner.embedders.1."): t for k, t in original.items() if "logit_scale" not in k}
    assert back.keys() == expected.keys()
    for k in expected:
        assert torch.equal(back[k], expected[k]), k


# ------------------------------------------------------------------------------------- tiny folders vs diffusers
@pytest.fixture(scope="module")
def base_folder(sdxl_pipe: Path) -> Path:
    return sdxl_pipe  # conftest.py: save_tiny_sdxl_pipe, shared with the broken-checkpoint tests


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory) -> Path:
    return save_tiny_sdxl_pipe(tmp_path_factory.mktemp("sdxl-refiner-pipe") / "tiny-sdxl-refiner", refiner=True,
                               seed=1)


def _reference(folder: Path, img2img: bool = False):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check(ours: Image.Image, theirs: np.ndarray, what: str) -> None:
    assert 0.2 < np.mean((theirs > 0.02) & (theirs < 0.98)), "saturated reference: the comparison would be empty"
    diff = max_pixel_diff(np.asarray(ours, dtype=np.int16), theirs)
    print(f"tiny SDXL diffusers folder, {what}: max pixel diff {diff * 255:.3f}/255 vs diffusers")
    assert diff <= 1 / 255


def test_base_folder_is_read_by_its_configs(base_folder: Path) -> None:
    b = load(base_folder)
    assert b.family is SDXL_BASE
    cond = b.text_encoder.config
    assert cond.clip == CLIPTextConfig(width=32, layers=3, heads=4, mlp_ratio=37 / 32)  # 4 heads: only the config says
    assert (cond.openclip.width, cond.openclip.heads, cond.openclip.embed_dim) == (64, 4, 32)
    assert (b.unet.config.num_heads, b.unet.config.adm_in_channels, b.unet.config.transformer_depth) == (4, 1568,
                                                                                                        (1, 1, 2))
    limits = b.limits()
    assert (limits.vae_factor, limits.native_size, b.vae.config.scale_factor) == (8, 64, 0.13025)


@pytest.mark.parametrize("focus", [None, FOCUS], ids=["plain", "gbsd"])
def test_base_folder_generates_what_diffusers_generates(base_folder: Path, focus: str | None) -> None:
    """txt2img at the folder's native 64x64 with CFG; GBSD switches diffusers' prompt_embeds and add_text_embeds (the
    pooled vector) at the stage boundary in callback_on_step_end, the size ids stay."""
    _txt2img_equals_diffusers(base_folder, focus)


@pytest.mark.parametrize("time_dim", [8, 5])
@pytest.mark.parametrize("focus", [None, FOCUS], ids=["plain", "gbsd"])
def test_other_valid_sdxl_configs_load_and_generate_what_diffusers_generates(tmp_path: Path, time_dim: int,
                                                                          focus: str | None) -> None:
    """Values diffusers accepts and sgm's architecture builds: size sinusoids `addition_time_embed_dim` wide (8 in
    diffusers' own tiny SDXL test pipelines; 5, odd, padded with a zero by both) where SDXL 1.0 has 256, and
    `time_embedding_dim` stated as its default 4 x block_out_channels[0]. Both were refused before."""
    folder = save_tiny_sdxl_pipe(tmp_path / "xl", time_dim=time_dim, time_embedding_dim=4 * 32)
    b = load(folder)
    assert b.text_encoder.config.micro_dim == time_dim and b.unet.config.adm_in_channels == 32 + 6 * time_dim
    _txt2img_equals_diffusers(folder, focus)


def _txt2img_equals_diffusers(folder: Path, focus: str | None) -> None:
    base_folder = folder
    n, alpha, layout = 8, 0.3, 0.5
    b, ref = load(base_folder), _reference(base_folder)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ours = generate(b, GenerationParams(PROMPT, focus=focus, alpha=alpha, layout=layout, steps=n), x_T=x_T)
    assert ours.image.size == (64, 64)
    callback = None
    if focus is not None:
        g, neg, g_pooled, neg_pooled = ref.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
        loc, _, loc_pooled, _ = ref.encode_prompt(focus, device="cpu", do_classifier_free_guidance=True)
        n_layout = layout_steps(n, layout)

        def callback(pipe, i, t, kwargs):
            if i != n_layout - 1:
                return {}
            return {"prompt_embeds": torch.cat([neg, alpha * g + (1 - alpha) * loc]),
                    "add_text_embeds": torch.cat([neg_pooled, alpha * g_pooled + (1 - alpha) * loc_pooled])}
    theirs = ref(PROMPT, negative_prompt=None, num_inference_steps=n, guidance_scale=7.5, eta=0.0, latents=x_T.clone(),
                 output_type="np", callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"]).images[0]
    assert theirs.shape == (64, 64, 3)  # diffusers' default size for the folder too
    _check(ours.image, theirs, focus or "plain")
    if focus is not None:  # the switch is seen: the plain image differs
        plain = generate(b, GenerationParams(PROMPT, steps=n), x_T=x_T)
        assert np.abs(np.asarray(plain.image, dtype=np.int16) - np.asarray(ours.image, dtype=np.int16)).max() > 2


def test_every_option_of_the_diffusers_classes_is_read_fixed_or_known_not_to_matter(base_folder: Path) -> None:
    """The review of the fixed-value lists, held against diffusers' and transformers' own signatures: every option of
    UNet2DConditionModel, AutoencoderKL and CLIPTextConfig is looked at by the translation (built, or refused unless
    it has SD's value: UNET_FIXED and friends) or listed in *_NOT_READ with the reason it decides nothing. (Before the
    review, mid_block_scale_factor was neither: a folder with 2 loaded, and diffusers halves the middle block's
    ResBlocks.)"""
    import inspect
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig

    class Looked(dict):  # a config that records which keys the translation looks at
        seen: set[str]

        def __init__(self, data: dict) -> None:
            super().__init__(data)
            self.seen = set()

        def __contains__(self, key: object) -> bool:
            self.seen.add(str(key))
            return super().__contains__(key)

        def __getitem__(self, key: str):
            self.seen.add(key)
            return super().__getitem__(key)

        def get(self, key: str, default=None):
            self.seen.add(key)
            return super().get(key, default)

    def options(cls: type) -> set[str]:
        return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}

    def read(part: str, *translations) -> set[str]:
        cfg = Looked(json.loads((base_folder / part / "config.json").read_text()))
        for translate in translations:
            translate(cfg)
        return cfg.seen

    unet = read("unet", dc.unet_config, dc.unet_sample_size, dc.unet_micro_dim)
    vae = read("vae", dc.vae_config)
    text = read("text_encoder", dc.clip_l_config) | read("text_encoder_2", dc.bigg_config)
    for cls, seen, not_read in ((UNet2DConditionModel, unet, dc.UNET_NOT_READ), (AutoencoderKL, vae, dc.VAE_NOT_READ),
                                (HFCLIPTextConfig, text, dc.TEXT_NOT_READ)):
        unreviewed = options(cls) - seen - set(not_read)
        print(f"{cls.__name__}: {len(options(cls))} options, {len(options(cls) & seen)} looked at, "
              f"{len(not_read)} known not to matter")
        assert not unreviewed, f"{cls.__name__} options neither read nor reviewed: {sorted(unreviewed)}"
        both = set(not_read) & seen - {"projection_dim"}  # read for bigG, not for a CLIPTextModel
        assert not both, f"{cls.__name__}: listed as not read, but read: {both}"


def test_refiner_folder_img2img_equals_diffusers(refiner_folder: Path) -> None:
    """The refiner folder (text_encoder_2 alone, requires_aesthetics_score): bigG as sgm's embedders.0, aesthetic
    score 6 / 2.5, the empty negative prompt encoded."""
    b = load(refiner_folder)
    assert b.family is SDXL_REFINER and b.text_encoder.config.clip is None
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    n, strength, seed = 10, 0.5, 4
    ours = generate(b, GenerationParams(PROMPT, steps=n, strength=strength, seed=seed), init_image=init)
    theirs = _reference(refiner_folder, img2img=True)(
        PROMPT, image=init, strength=strength, negative_prompt=None, num_inference_steps=n, guidance_scale=7.5, eta=0.0,
        generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    _check(ours.image, theirs, "refiner img2img")


def test_both_text_encoder_layouts_load_the_same_weights(base_folder: Path, tmp_path: Path) -> None:
    """transformers 4.x wrote `text_model.`-level names with a position_ids buffer (text_encoder and text_encoder_2),
    and .bin / fp16 file names exist; transformers 5 writes text_encoder flat. All give the same tensors."""
    folder = shutil.copytree(base_folder, tmp_path / "old-layout")
    flat = load_file(str(folder / "text_encoder" / "model.safetensors"))
    assert any(k.startswith("encoder.layers.") for k in flat)  # transformers 5: flat, no position_ids
    old = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in flat.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(old, folder / "text_encoder" / "pytorch_model.bin")
    te2 = folder / "text_encoder_2" / "model.safetensors"
    sd2 = load_file(str(te2))
    assert "text_projection.weight" in sd2 and any(k.startswith("text_model.encoder.") for k in sd2)
    te2.unlink()
    save_file({**sd2, "text_model.embeddings.position_ids": torch.arange(77)[None]},
              str(folder / "text_encoder_2" / "model.fp16.safetensors"))
    a, b = read_state_dict(base_folder), read_state_dict(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(re.search(r"position_ids|logit_scale", k) for k in a)


