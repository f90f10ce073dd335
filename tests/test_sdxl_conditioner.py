"""SDXL's conditioner (gbsd_core/sdxl_conditioner.py): keys vs the golden lists, config inference, the layer choice
of both towers and the pooled vector against independent references (transformers CLIPTextModel /
CLIPTextModelWithProjection through diffusers' single-file converters, open_clip's own `encode_text`), and the
micro-conditioning against diffusers' `Timesteps`."""
from __future__ import annotations

import gc
import time

import pytest
import torch
from _reference import transformers_bigg, transformers_clip_l
from _sdxl import TINY_CONDITIONER, TINY_REFINER_CONDITIONER
from _text import EOS, TOL, randomize_, sd_tokens
from _util import LDM_KEYS, meta_state_dict, read_keys_tsv, rel_err

from gbsd_core.sdxl_conditioner import (
    BIGG,
    SDXLConditioner,
    SDXLConditionerConfig,
    micro_embedding,
)

PREFIX = "conditioner."
GOLDEN = {"base": "sdxl_base.tsv", "refiner": "sdxl_refiner.tsv"}
CONFIGS = {"base": SDXLConditionerConfig.base, "refiner": SDXLConditionerConfig.refiner}


def golden_rows(model: str) -> dict:
    return {k[len(PREFIX):]: v for k, v in read_keys_tsv(LDM_KEYS / GOLDEN[model]).items() if k.startswith(PREFIX)}


@pytest.mark.parametrize("model", ["base", "refiner"])
def test_keys_match_the_golden_list_on_meta(model):
    rows = golden_rows(model)
    required = {k: shape for k, (shape, _, opt) in rows.items() if opt is None}
    with torch.device("meta"):
        ours = {k: tuple(t.shape) for k, t in SDXLConditioner(CONFIGS[model]()).state_dict().items()}
    assert sorted(set(ours) ^ set(required)) == []
    assert {k: s for k, s in ours.items() if s != required[k]} == {}
    # 197 CLIP-L rows (with the optional position_ids) + 390 bigG rows in the base; bigG alone in the refiner
    assert len(rows) == (587 if model == "base" else 390)
    # the config is read back from the golden names and shapes alone
    assert SDXLConditionerConfig.from_state_dict(meta_state_dict(rows)) == CONFIGS[model]()


def test_config_facts():
    assert BIGG.width == 1280 and BIGG.layers == 32 and BIGG.heads == 20 and BIGG.embed_dim == 1280
    assert SDXLConditionerConfig.base().vector_dim == 2816  # the base UNet's adm_in_channels
    assert SDXLConditionerConfig.refiner().vector_dim == 2560
    for cfg in (TINY_CONDITIONER, TINY_REFINER_CONDITIONER):
        assert SDXLConditionerConfig.from_state_dict(SDXLConditioner(cfg).state_dict()) == cfg
    assert SDXLConditioner(TINY_CONDITIONER).pad_token_ids == (EOS, 0)
    assert SDXLConditioner(TINY_REFINER_CONDITIONER).pad_token_ids == (0,)


def test_micro_values_in_sgm_order():
    base, refiner = SDXLConditioner(TINY_CONDITIONER), SDXLConditioner(TINY_REFINER_CONDITIONER)
    # (width, height) = (1344, 768): sgm stores (height, width) pairs
    assert base.micro_values((1344, 768)) == [768, 1344, 0, 0, 768, 1344]
    assert base.micro_values((1344, 768), negative=True) == [768, 1344, 0, 0, 768, 1344]
    assert refiner.micro_values((1024, 1024)) == [1024, 1024, 0, 0, 6.0]
    assert refiner.micro_values((1024, 1024), negative=True) == [1024, 1024, 0, 0, 2.5]


def test_micro_embedding_matches_diffusers_timesteps():
    from diffusers.models.embeddings import Timesteps

    ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0], [512.0, 512.0, 3.0, 0.0, 512.0, 6.5]])
    # diffusers' UNet: add_time_proj = Timesteps(256, flip_sin_to_cos=True, 0) on time_ids.flatten(), reshaped
    ref = Timesteps(256, True, 0)(ids.flatten()).reshape(2, -1)
    err = rel_err(micro_embedding(ids), ref)
    print(f"micro-conditioning embedding vs diffusers Timesteps: rel_err {err:.2e}")
    assert micro_embedding(ids).shape == (2, 6 * 256) and err <= 1e-6


def _tiny(cfg: SDXLConditionerConfig, seed: int = 0) -> SDXLConditioner:
    m = SDXLConditioner(cfg).eval()
    randomize_(m, seed)
    return m


def _tokens(n_towers: int) -> list[torch.Tensor]:
    """The same prompts, padded the way each tower's tokenizer pads (CLIP-L: 49407, open_clip: 0)."""
    pads = [EOS, 0] if n_towers == 2 else [0]
    return [sd_tokens(pad) for pad in pads]


def test_tiny_base_parity_with_transformers_twins():
    ours = _tiny(TINY_CONDITIONER)
    clip_l, bigg = transformers_clip_l(ours), transformers_bigg(ours)
    tokens = _tokens(2)
    with torch.no_grad():
        context, pooled = ours(tokens)
        # what diffusers' StableDiffusionXLPipeline.encode_prompt does: hidden_states[-2] of both, text_embeds of #2
        out_l = clip_l(input_ids=tokens[0], output_hidden_states=True)
        out_g = bigg(input_ids=tokens[1], output_hidden_states=True)
    ref_context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    err_c, err_p = rel_err(context, ref_context), rel_err(pooled, out_g.text_embeds)
    print(f"tiny SDXL conditioner vs transformers: context rel_err {err_c:.2e}, pooled rel_err {err_p:.2e}")
    assert context.shape == (3, 77, 64 + 128) and pooled.shape == (3, 32)
    assert err_c <= TOL and err_p <= TOL
    # the layer choice is real: the last layer, or the final LayerNorm, is something else
    assert rel_err(context[..., :64], out_l.last_hidden_state) > 1e-2
    assert rel_err(context[..., 64:], out_g.last_hidden_state) > 1e-2


def test_tiny_refiner_parity_with_transformers_twin():
    ours = _tiny(TINY_REFINER_CONDITIONER, seed=1)
    bigg = transformers_bigg(ours)  # diffusers reads the refiner's bigG from conditioner.embedders.0.model.
    tokens = _tokens(1)
    with torch.no_grad():
        context, pooled = ours(tokens)
        out = bigg(input_ids=tokens[0], output_hidden_states=True)
    err_c, err_p = rel_err(context, out.hidden_states[-2]), rel_err(pooled, out.text_embeds)
    print(f"tiny SDXL refiner conditioner vs transformers: context rel_err {err_c:.2e}, pooled rel_err {err_p:.2e}")
    assert err_c <= TOL and err_p <= TOL


def test_tiny_pooled_and_penultimate_match_open_clip():
    """Against open_clip's own text tower: `encode_text` is exactly the pooled vector; the context is the output of
    all but the last resblock, taken before ln_final (sgm FrozenOpenCLIPEmbedder2.text_transformer_forward)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = TINY_REFINER_CONDITIONER.openclip
    ref = CLIP(embed_dim=c.embed_dim, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                               image_size=16),
               text_cfg=CLIPTextCfg(context_length=77, vocab_size=c.vocab_size, width=c.width, heads=c.heads,
                                    layers=c.layers)).eval()
    del ref.visual
    randomize_(ref, 3)
    ours = SDXLConditioner(TINY_REFINER_CONDITIONER).eval()
    ours.embedders[0].load_state_dict({"model." + k: v for k, v in ref.state_dict().items()}, strict=True)
    tokens = _tokens(1)[0]
    with torch.no_grad():
        context, pooled = ours([tokens])
        x = ref.token_embedding(tokens) + ref.positional_embedding
        if not ref.transformer.batch_first:  # open_clip < 2.24 ran the stack sequence-first
            x = x.permute(1, 0, 2)
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        if not ref.transformer.batch_first:
            x = x.permute(1, 0, 2)
        err_c, err_p = rel_err(context, x), rel_err(pooled, ref.encode_text(tokens))
    print(f"tiny bigG-shaped tower vs open_clip: penultimate rel_err {err_c:.2e}, encode_text rel_err {err_p:.2e}")
    assert err_c <= TOL and err_p <= TOL


def test_towers_get_their_own_padding():
    ours = _tiny(TINY_CONDITIONER)
    with torch.no_grad():
        right = ours(_tokens(2))
        wrong = ours([sd_tokens(EOS), sd_tokens(EOS)])  # bigG fed CLIP-L's padding
    assert torch.equal(right[0][..., :64], wrong[0][..., :64])
    assert rel_err(wrong[0][..., 64:], right[0][..., 64:]) > 1e-3  # padding positions do attend to the pad ids
    with pytest.raises(ValueError, match="one per text embedder"):
        ours(_tokens(1))


# ------------------------------------------------------------------------------------------ full size (-m fullsize)
# Both full-size SDXL towers (CLIP-L 123 M, bigG 695 M parameters) vs the transformers twins diffusers' single-file
# loader makes of them, sharing storage. Run under `flock /tmp/gbsd-fullsize.lock`.
@pytest.mark.fullsize
def test_fullsize_sdxl_text_encoders_parity():
    from _fullsize import fill_from_pool_, peak_rss_gb, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    with torch.device("meta"):
        ours = SDXLConditioner(SDXLConditionerConfig.base())
    fill_from_pool_(ours.to_empty(device="cpu"), seed=1)
    clip_l, bigg = transformers_clip_l(ours, share=True), transformers_bigg(ours, share=True)
    tokens = [sd_tokens(pad, (8, 75)) for pad in (EOS, 0)]
    with torch.no_grad():
        context, pooled = ours(tokens)
        out_l = clip_l(input_ids=tokens[0], output_hidden_states=True)
        out_g = bigg(input_ids=tokens[1], output_hidden_states=True)
    errs = {"CLIP-L hidden_states[-2]": rel_err(context[..., :768], out_l.hidden_states[-2]),
            "bigG hidden_states[-2]": rel_err(context[..., 768:], out_g.hidden_states[-2]),
            "bigG text_embeds (pooled)": rel_err(pooled, out_g.text_embeds)}
    peak = peak_rss_gb()
    for name, err in errs.items():
        print(f"full-size SDXL {name} vs transformers: rel_err {err:.2e}")
    print(f"full-size SDXL text encoders: {time.perf_counter() - t0:.1f} s, peak RSS {peak:.1f} GB")
    assert context.shape == (2, 77, 2048) and pooled.shape == (2, 1280)
    del ours, clip_l, bigg, out_l, out_g
    gc.collect()
    assert all(err <= TOL for err in errs.values()), errs
    assert peak <= 20.0
