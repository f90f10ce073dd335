"""Key-set golden tests: our full-size modules (built on the meta device, so this is fast) against the key lists of
the reference `LatentDiffusion` models in fixtures/ldm_keys, and the diffusers→original table against both the
diffusers-layout key lists and diffusers' own original→diffusers converters (an independent implementation)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from _util import LDM_KEYS, read_keys_tsv
from gbsd_core import diffusers_layout as dl
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.loading import PREFIXES, _check_strict, split_components
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

CONFIGS = Path(__file__).parent / "configs" / "sd15"
GOLDEN = {"sd1": "sd1_v1-inference.tsv", "sd2-512": "sd2_v2-inference.tsv", "sd2-768-v": "sd2_v2-inference-v.tsv"}


def meta_modules(family: str) -> dict[str, torch.nn.Module]:
    sd1 = family == "sd1"
    with torch.device("meta"):
        return {
            "unet": UNetModel(UNetConfig.sd1() if sd1 else UNetConfig.sd2()),
            "vae": AutoencoderKL(VAEConfig()),
            "text_encoder": CLIPTextEncoder(CLIPTextConfig()) if sd1 else OpenCLIPTextEncoder(OpenCLIPTextConfig()),
        }


def prefixed_rows(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {PREFIXES[name] + k: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, m in modules.items() for k, t in m.state_dict().items()}


def meta_state_dict(rows: dict) -> dict[str, torch.Tensor]:
    dtypes = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
    return {k: torch.empty(shape, dtype=dtypes[dtype], device="meta") for k, (shape, dtype, _) in rows.items()}


@pytest.mark.parametrize("family", list(GOLDEN))
def test_modules_match_golden_keys(family: str) -> None:
    golden = read_keys_tsv(LDM_KEYS / GOLDEN[family])
    ours = prefixed_rows(meta_modules(family))
    required = {k for k, (_, _, opt) in golden.items() if opt is None}
    missing = sorted(required - ours.keys())
    extra = sorted(ours.keys() - golden.keys())
    wrong = [(k, ours[k], golden[k][:2]) for k in ours.keys() & golden.keys() if ours[k] != golden[k][:2]]
    print(f"{family}: {len(ours)} keys ours, {len(required)} required, {len(golden)} in the golden list")
    assert not missing, f"{len(missing)} missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} not in the golden list, e.g. {extra[:5]}"
    assert not wrong, f"{len(wrong)} differ in shape/dtype, e.g. {wrong[:5]}"
    optional_present = sorted(k for k in ours if golden[k][2] is not None)
    assert not optional_present, optional_present  # position_ids / schedule buffers are not ours to have


@pytest.mark.parametrize("family", list(GOLDEN))
@pytest.mark.parametrize("with_ema", [False, True], ids=["", "ema"])
def test_golden_file_passes_strict_loading(family: str, with_ema: bool) -> None:
    """A file with exactly the reference key set (optional rows included, plus model_ema.* for full training files)
    splits cleanly, its configs are inferred as the family's, and the strict check accepts it."""
    rows = read_keys_tsv(LDM_KEYS / GOLDEN[family])
    if with_ema:
        rows.update(read_keys_tsv(LDM_KEYS / GOLDEN[family].replace(".tsv", ".model_ema.tsv")))
    parts = split_components(meta_state_dict(rows), Path(GOLDEN[family]))
    sd1 = family == "sd1"
    assert UNetConfig.from_state_dict(parts["unet"]) == (UNetConfig.sd1() if sd1 else UNetConfig.sd2())
    assert VAEConfig.from_state_dict(parts["vae"]) == VAEConfig()
    te_cfg = (CLIPTextConfig.from_state_dict(parts["text_encoder"]) if sd1
              else OpenCLIPTextConfig.from_state_dict(parts["text_encoder"]))
    assert te_cfg == (CLIPTextConfig() if sd1 else OpenCLIPTextConfig())
    for name, module in meta_modules(family).items():
        _check_strict(name, module, parts[name], Path(GOLDEN[family]))


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
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

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
