"""Loading and saving checkpoints with tiny random models: round trips, refusals, family detection, diffusers folders.

The diffusers-folder tests are parity tests against independent references: a diffusers `UNet2DConditionModel` /
`AutoencoderKL` and a transformers `CLIPTextModel` with random weights are saved with their own `save_pretrained`,
loaded by us through the diffusers→original table, and must give the same outputs.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _util import rel_err
from gbsd_core import loading
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.family import SD1, SD2_512, SD2_768_V, detect
from gbsd_core.loading import CheckpointError, load, read_state_dict, save_single_file
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

TOL = 1e-5
# Tiny but complete: two levels, attention at level 0 and in the middle, 8 heads as SD1 (context 768 => 8 heads is
# what UNetConfig.from_state_dict infers), one res block per level.
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                       num_heads=8, context_dim=768)
TINY_UNET_SD2 = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                           num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_CLIP = CLIPTextConfig(width=64, layers=2, heads=1)  # heads = width // 64 is what from_state_dict infers
TINY_OPENCLIP = OpenCLIPTextConfig(width=128, layers=3, heads=2, embed_dim=32)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (biases, norm affines, zero-initialised output convs), scaled by fan-in so
    activations stay O(1) through a deep net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(r / (p[0].numel() ** 0.5))
            elif "norm" in name or ".ln_" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(0.05 * r)
    return module.eval()


def tiny_modules(sd2: bool = False, seed: int = 0) -> dict[str, torch.nn.Module]:
    return {
        "unet": randomize_(UNetModel(TINY_UNET_SD2 if sd2 else TINY_UNET), seed),
        "vae": randomize_(AutoencoderKL(TINY_VAE), seed + 1),
        "text_encoder": randomize_(OpenCLIPTextEncoder(TINY_OPENCLIP) if sd2 else CLIPTextEncoder(TINY_CLIP), seed + 2),
    }


def tokens(n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    t = torch.randint(1, 49406, (n, 77), generator=g)
    t[:, 0], t[:, 12:] = 49406, 49407
    return t


@torch.no_grad()
def outputs(modules: dict[str, torch.nn.Module], context_dim: int = 768) -> dict[str, torch.Tensor]:
    """UNet noise prediction, VAE decode + encode mean, text embedding: everything a bundle uses."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, context_dim, generator=g)
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    vae = modules["vae"]
    return {
        "unet": modules["unet"](x, torch.tensor([10, 900]), ctx),
        "decode": vae.decode(x[:1]),
        "encode": vae.encode(img).mean,
        "text": modules["text_encoder"](tokens()),
    }


def bundle_modules(b: loading.SDBundle) -> dict[str, torch.nn.Module]:
    return {"unet": b.unet, "vae": b.vae, "text_encoder": b.text_encoder}


def assert_same_weights(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module]) -> None:
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


@pytest.fixture(scope="module")
def sd1_modules() -> dict[str, torch.nn.Module]:
    return tiny_modules()


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory, sd1_modules: dict[str, torch.nn.Module]) -> Path:
    return save_single_file(sd1_modules, tmp_path_factory.mktemp("sd1") / "tiny.safetensors")


# ------------------------------------------------------------------------------------------------ round trips
def test_single_file_round_trip(sd1_file: Path, sd1_modules: dict[str, torch.nn.Module]) -> None:
    b = load(sd1_file)
    assert b.family is SD1 and b.scheduler.prediction_type == "epsilon" and b.tokenizer is not None
    assert_same_weights(sd1_modules, bundle_modules(b))
    want, got = outputs(sd1_modules), outputs(bundle_modules(b))
    for k in want:
        print(f"round trip {k}: rel_err {rel_err(got[k], want[k]):.1e}")
        assert torch.equal(got[k], want[k]), k
    assert not any(p.requires_grad for p in b.unet.parameters())
    emb = b.encode_prompt(["a photo of a cat", "a dog"])
    assert emb.shape == (2, 77, 64)
    info = b.describe()
    assert info["family"] == "sd1" and info["parameters"]["vae"] == sum(p.numel() for p in b.vae.parameters())


def test_file_layout_is_original(sd1_file: Path) -> None:
    keys = set(load_file(str(sd1_file)))
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not list(sd1_file.parent.glob(".*tmp")), "temporary file left behind"


def test_writer_replaces_atomically_and_converts_dtype(tmp_path: Path, sd1_modules: dict) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old contents")
    save_single_file(sd1_modules, path, dtype=torch.float16)
    sd = load_file(str(path))
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert os.listdir(tmp_path) == ["m.safetensors"]
    b = load(path)  # fp16 file -> fp32 modules by default
    assert next(b.unet.parameters()).dtype == torch.float32
    b16 = load(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in b16.unet.parameters())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_fp32_load_does_not_copy(sd1_file: Path) -> None:
    # safetensors hands out tensors on a private map of the file and assign=True makes them the parameters, so
    # the weights live in the file mapping, not in a fresh allocation.
    b = load(sd1_file)
    ptr = b.unet.state_dict()["input_blocks.0.0.weight"].data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            assert fields[-1] == str(sd1_file.resolve()), line
            break
    else:
        pytest.fail("parameter memory not found in /proc/self/maps")


def test_ckpt_plain_dict_and_legacy_format(tmp_path: Path, sd1_file: Path, sd1_modules: dict) -> None:
    sd = dict(load_file(str(sd1_file)))
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "lightning.ckpt")
    assert_same_weights(sd1_modules, bundle_modules(load(tmp_path / "lightning.ckpt")))
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # not mmap-able: fallback path
    assert_same_weights(sd1_modules, bundle_modules(load(tmp_path / "legacy.pt")))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_ckpt_that_runs_code_is_refused(tmp_path: Path, sd1_file: Path) -> None:
    marker = tmp_path / "code_was_executed"
    sd = dict(load_file(str(sd1_file)))
    torch.save({"state_dict": sd, "callbacks": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*(os|posix)\.mkdir") as e:
        load(tmp_path / "evil.ckpt")
    print(e.value)
    assert not marker.exists(), "the pickle's code ran"


# ------------------------------------------------------------------------------------------------ bad files
def _write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("/nonexistent/model.safetensors")


def test_truncated_safetensors(tmp_path: Path, sd1_file: Path) -> None:
    data = sd1_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load(tmp_path / "cut.safetensors")
    print(e.value)


def test_not_stable_diffusion(tmp_path: Path) -> None:
    path = _write(tmp_path / "other.safetensors", {"encoder.weight": torch.ones(2, 2), "head.bias": torch.ones(2)})
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint") as e:
        load(path)
    print(e.value)


def test_unknown_suffix(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load(tmp_path / "model.onnx")


def test_missing_component(tmp_path: Path, sd1_file: Path) -> None:
    sd = {k: v for k, v in load_file(str(sd1_file)).items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="has no vae weights"):
        load(_write(tmp_path / "novae.safetensors", sd))


BAD_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"


def test_wrong_shape(tmp_path: Path, sd1_file: Path) -> None:
    sd = dict(load_file(str(sd1_file)))
    sd[BAD_KEY] = torch.zeros(sd[BAD_KEY].shape[0], sd[BAD_KEY].shape[1] + 1)
    with pytest.raises(CheckpointError, match=rf"1 shape mismatches: {BAD_KEY}: file \[32, 33\] vs model \[32, 32\]") as e:
        load(_write(tmp_path / "shape.safetensors", sd))
    print(e.value)


def test_missing_key(tmp_path: Path, sd1_file: Path) -> None:
    sd = dict(load_file(str(sd1_file)))
    del sd[BAD_KEY]
    with pytest.raises(CheckpointError, match=rf"unet does not match.*\n  1 missing keys: {BAD_KEY}$") as e:
        load(_write(tmp_path / "missing.safetensors", sd))
    print(e.value)


def test_missing_key_needed_for_inference(tmp_path: Path, sd1_file: Path) -> None:
    sd = dict(load_file(str(sd1_file)))
    del sd["first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match="cannot infer the vae architecture, missing key "
                                              "first_stage_model.encoder.conv_in.weight"):
        load(_write(tmp_path / "missing2.safetensors", sd))


def test_unexpected_keys(tmp_path: Path, sd1_file: Path) -> None:
    sd = dict(load_file(str(sd1_file)))
    inside = {**sd, "model.diffusion_model.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: model\.diffusion_model\.extra\.weight"):
        load(_write(tmp_path / "u1.safetensors", inside))
    outside = {**sd, "controlnet.zero_convs.0.weight": torch.zeros(3), "logit_bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"2 unexpected keys outside.*controlnet\.zero_convs\.0\.weight, logit_bias"):
        load(_write(tmp_path / "u2.safetensors", outside))


def test_allowlisted_keys_load(tmp_path: Path, sd1_file: Path, sd1_modules: dict) -> None:
    sd = dict(load_file(str(sd1_file)))
    extra = {name: torch.rand(1000) for name in loading.SCHEDULE_BUFFERS}
    extra["model_ema.decay"] = torch.tensor(0.9999)
    extra["model_ema.num_updates"] = torch.tensor(5, dtype=torch.int32)
    extra["model_ema.diffusion_modelinput_blocks00weight"] = sd["model.diffusion_model.input_blocks.0.0.weight"] + 1
    extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert len(loading.SCHEDULE_BUFFERS) == 12
    b = load(_write(tmp_path / "full.safetensors", {**sd, **extra}))
    assert_same_weights(sd1_modules, bundle_modules(b))  # model.* is used, not model_ema.*


def test_sd1_without_text_model_level(tmp_path: Path, sd1_file: Path, sd1_modules: dict) -> None:
    pre = "cond_stage_model.transformer.text_model."
    sd = {k.replace(pre, "cond_stage_model.transformer."): v for k, v in load_file(str(sd1_file)).items()}
    assert not any(pre in k for k in sd)
    assert_same_weights(sd1_modules, bundle_modules(load(_write(tmp_path / "flat.safetensors", sd))))


# ------------------------------------------------------------------------------------------------ families
SD1_KEYS = ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
SD2_KEYS = ["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"]


def test_family_detection(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    assert detect(SD1_KEYS, f) is SD1
    with pytest.warns(UserWarning, match="family='sd2-768-v'"):
        assert detect(SD2_KEYS, f) is SD2_512
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every hint below decides without a warning
        assert detect(SD2_KEYS, f, override="sd2-768-v") is SD2_768_V
        assert detect(SD2_KEYS, f, prediction_type="v_prediction") is SD2_768_V
        assert detect(SD2_KEYS, f, prediction_type="epsilon") is SD2_512
        assert detect(SD2_KEYS, tmp_path / "v2-1_768-ema-pruned.safetensors") is SD2_768_V
        assert detect(SD2_KEYS, tmp_path / "768-v-ema.ckpt") is SD2_768_V
        assert detect(SD2_KEYS, tmp_path / "my-model-v.safetensors") is SD2_768_V
        assert detect(SD2_KEYS, tmp_path / "v2-1_512-ema-pruned.safetensors") is SD2_512
        assert detect(SD2_KEYS, tmp_path / "512-base-ema.safetensors") is SD2_512
        # sidecar yaml beats the file name; the override beats everything
        f2 = tmp_path / "sd21-512ish.safetensors"
        f2.write_bytes(b"")
        (tmp_path / "sd21-512ish.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
        assert detect(SD2_KEYS, f2) is SD2_768_V
        assert detect(SD2_KEYS, f2, override="sd2-512") is SD2_512
    with pytest.raises(ValueError, match="expects a clip text encoder"):
        detect(SD2_KEYS, f, override="sd1")
    assert (SD1.pad_token_id, SD2_512.pad_token_id, SD2_768_V.resolution) == (49407, 0, 768)


def test_sd2_single_file_family_from_name(tmp_path: Path) -> None:
    mods = tiny_modules(sd2=True)
    path = save_single_file(mods, tmp_path / "tiny-768-v.safetensors")
    b = load(path)
    assert b.family is SD2_768_V and b.scheduler.prediction_type == "v_prediction"
    assert b.unet.config.upcast_attention and b.text_encoder.config.penultimate
    want, got = outputs(mods, 1024), outputs(bundle_modules(b), 1024)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert b.encode_prompt("a cat").shape == (1, 77, 128)
    with pytest.raises(ValueError, match="clip_skip"):
        b.encode_prompt("a cat", clip_skip=2)
    with pytest.raises(CheckpointError, match="expects a clip text encoder"):
        load(path, family="sd1")


def test_written_sd2_v_file_remembers_its_family_whatever_its_name(tmp_path: Path) -> None:
    mods = tiny_modules(sd2=True)
    v_file = save_single_file(load(save_single_file(mods, tmp_path / "a-768-v.safetensors")),
                              tmp_path / "renamed.safetensors")  # a bundle carries its family into the header
    assert load(v_file).family is SD2_768_V
    eps_file = save_single_file(mods, tmp_path / "plain.safetensors", family="sd2-512")
    assert load(eps_file).family.name == "sd2-512"
    assert load(eps_file, family="sd2-768-v").family is SD2_768_V  # an explicit family still wins


def test_bundle_image_helpers(sd1_file: Path) -> None:
    b = load(sd1_file)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    images = b.decode_latents(latents)
    assert len(images) == 2 and images[0].size == (8, 8)  # tiny VAE: 2 levels, factor 2 and images[0].mode == "RGB"
    ref = ((b.vae.decode(latents / 0.18215) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0) * 255
    import numpy as np

    assert np.abs(np.asarray(images[0], dtype=np.float32) - ref.numpy()).max() <= 0.5 + 1e-3
    z = b.encode_images(images, sample=False)
    assert z.shape == (2, 4, 4, 4)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    assert torch.allclose(z, b.vae.encode(x / 127.5 - 1).mean * 0.18215)
    z1 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    z2 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)


# ------------------------------------------------------------------------------------------------ diffusers folders
def _diffusers_models(sd2: bool):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128) if sd2 else (32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024 if sd2 else 768,
        # diffusers' misnomer: attention_head_dim is the head *count* (SD1: 8; SD2: channels // 64 per level)
        attention_head_dim=(1, 2) if sd2 else 8,
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
    from diffusers import DDIMScheduler

    for name, m in models.items():
        m.save_pretrained(folder / name)
    DDIMScheduler(prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@torch.no_grad()
def _compare_with_diffusers(b: loading.SDBundle, ref: dict, context_dim: int) -> None:
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
    _compare_with_diffusers(b, ref, 1024 if sd2 else 768)


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
    _compare_with_diffusers(load(folder), ref, 768)


def test_diffusers_folder_missing_part(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="no unet/ weights"):
        load(tmp_path)


def test_import_is_cheap() -> None:
    """`import gbsd_core.loading` must not pull in open_clip (tokenizer), safetensors or the reference libraries."""
    import subprocess
    import sys

    code = ("import sys, gbsd_core.loading; "
            "print(sorted(m for m in ('open_clip', 'safetensors', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
