"""Loading and saving checkpoints with tiny random models: round trips, refusals, family detection, diffusers folders.

The diffusers-folder tests are parity tests against independent references: a diffusers `UNet2DConditionModel` /
`AutoencoderKL` and a transformers `CLIPTextModel` with random weights are saved with their own `save_pretrained`,
loaded by us through the diffusers→original table, and must give the same outputs.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from _broken import BROKEN, Workshop
from _fullsize import fill_from_pool_
from _tiny import TOL, assert_same_weights, bundle_modules, outputs, save_tiny_pipe, tiny_modules
from _util import CONFIGS, GOLDEN, LDM_KEYS, meta_state_dict, read_keys_tsv, rel_err
from safetensors.torch import load_file, save_file

from gbsd_core import loading
from gbsd_core.bundle import SDBundle
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.family import SD1, SD2_768_V
from gbsd_core.loading import (
    PREFIXES,
    CheckpointError,
    check_strict,
    load,
    read_state_dict,
    save_single_file,
    split_components,
)
from gbsd_core.openclip_text import OpenCLIPTextConfig, OpenCLIPTextEncoder
from gbsd_core.unet import UNetConfig, UNetModel, unet_config_from_state_dict
from gbsd_core.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def sd1_modules() -> dict[str, torch.nn.Module]:
    return tiny_modules()


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory, sd1_modules: dict[str, torch.nn.Module]) -> Path:
    return save_single_file(sd1_modules, tmp_path_factory.mktemp("sd1") / "tiny.safetensors")


# ------------------------------------------------------------------------------------------------ round trips
def test_single_file_round_trip(sd1_file: Path, sd1_modules: dict[str, torch.nn.Module]) -> None:
    b = load(sd1_file)
    assert b.family is SD1 and b.family.prediction_type == "epsilon" and b.tokenizer is not None
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


def test_half_load_keeps_the_vae_in_fp32_with_the_files_weights(sd1_file: Path) -> None:
    """dtype= is the UNet's and the text encoder's; the VAE stays fp32 (its decoder overflows fp16), with the file's
    weights as they are -- not rounded through the half dtype first."""
    full = load(sd1_file)
    for dtype in (torch.float16, torch.bfloat16):
        half = load(sd1_file, dtype=dtype)
        assert next(half.unet.parameters()).dtype == dtype and next(half.text_encoder.parameters()).dtype == dtype
        sd, ref = half.vae.state_dict(), full.vae.state_dict()
        assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], ref[k]) for k in ref)
    assert next(load(sd1_file, vae_dtype=torch.bfloat16).vae.parameters()).dtype == torch.bfloat16


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


@pytest.fixture(scope="module")
def good_pipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipe(tmp_path_factory.mktemp("pipe") / "tiny-pipe", layers_per_block=1, text_layers=1)


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_checkpoints_are_refused_naming_the_problem(case, tmp_path: Path, good_pipe: Path,
                                                          sdxl_pipe: Path) -> None:
    name, build, needle = case
    path = build(Workshop(tmp_path, good_pipe, sdxl_pipe))
    with pytest.raises(CheckpointError) as e:
        load(path)
    print(f"{name}: {e.value}")
    assert needle in str(e.value)


def test_a_half_load_refuses_weights_that_overflow_fp16(tmp_path: Path) -> None:
    w = Workshop(tmp_path, tmp_path)
    path = w.edited(lambda sd: sd["model.diffusion_model.out.2.weight"].view(-1).__setitem__(0, 1e6))
    assert load(path).unet is not None  # fine in fp32 (and bf16: its range is fp32's)
    assert load(path, dtype=torch.bfloat16).unet is not None
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.out\.2\.weight.*float16") as e:
        load(path, dtype=torch.float16)
    print(e.value)


BAD_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"


def test_wrong_shape(tmp_path: Path, sd1_file: Path) -> None:
    sd = dict(load_file(str(sd1_file)))
    sd[BAD_KEY] = torch.zeros(sd[BAD_KEY].shape[0], sd[BAD_KEY].shape[1] + 1)
    with pytest.raises(CheckpointError, match=rf"1 shape mismatches: {BAD_KEY}: file \[64, 65\] vs model \[64, 64\]") as e:
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


def test_written_sd2_v_file_remembers_its_family_whatever_its_name(tmp_path: Path) -> None:
    mods = tiny_modules(sd2=True)
    v_file = save_single_file(load(save_single_file(mods, tmp_path / "a-768-v.safetensors")),
                              tmp_path / "renamed.safetensors")  # a bundle carries its family into the header
    assert load(v_file).family is SD2_768_V
    eps_file = save_single_file(mods, tmp_path / "plain.safetensors", family="sd2-512")
    assert load(eps_file).family.name == "sd2-512"
    assert load(eps_file, family="sd2-768-v").family is SD2_768_V  # an explicit family still wins


def test_import_is_cheap() -> None:
    """`import gbsd_core.loading` must not pull in open_clip (tokenizer), safetensors or the reference libraries."""
    import subprocess
    import sys

    code = ("import sys, gbsd_core.loading; "
            "print(sorted(m for m in ('open_clip', 'safetensors', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


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
    assert unet_config_from_state_dict(parts["unet"]) == (UNetConfig.sd1() if sd1 else UNetConfig.sd2())
    assert VAEConfig.from_state_dict(parts["vae"]) == VAEConfig()
    te_cfg = (CLIPTextConfig.from_state_dict(parts["text_encoder"]) if sd1
              else OpenCLIPTextConfig.from_state_dict(parts["text_encoder"]))
    assert te_cfg == (CLIPTextConfig() if sd1 else OpenCLIPTextConfig())
    for name, module in meta_modules(family).items():
        check_strict(name, module, parts[name], Path(GOLDEN[family]))


# ------------------------------------------------------------------------------------------ full size (-m fullsize)
# A random SD1.5-shaped checkpoint written by our writer must load (1) in gbsd and (2) in diffusers'
# `StableDiffusionPipeline.from_single_file` (offline, with the local config folder tests/configs/sd15), giving the
# same UNet / VAE / text outputs; and (3) the diffusers `save_pretrained` folder of that pipeline must load in gbsd to
# the very same weights and outputs. 16x16 latents keep it cheap; everything is file-backed (mmap), so RAM stays low.
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def _random_sd15(path: Path, seed: int = 0) -> None:
    """Build on meta, allocate uninitialised, fill with seeded fan-in-scaled noise (_fullsize.fill_from_pool_: copying
    from a pool takes seconds where drawing 1.07 G normals takes ~20 s on two cores), write, free."""
    with torch.device("meta"):
        modules = {"unet": UNetModel(UNetConfig.sd1()), "vae": AutoencoderKL(VAEConfig()),
                   "text_encoder": CLIPTextEncoder(CLIPTextConfig())}
    for i, name in enumerate(modules):
        modules[name] = fill_from_pool_(modules[name].to_empty(device="cpu"), seed + i)
    save_single_file(modules, path)
    del modules
    gc.collect()


def _rss() -> str:
    """Anonymous (heap) and file-backed (mmap'ed checkpoint pages, reclaimable) resident memory."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    gb = {k: int(status.get(k, "0 kB").split()[0]) / 1e6 for k in ("RssAnon", "RssFile")}
    return f"RSS anon {gb['RssAnon']:.1f} GB, file-backed {gb['RssFile']:.1f} GB"


def _tokenizer_files(folder: Path) -> None:
    """vocab.json / merges.txt for a transformers CLIPTokenizer, from the BPE table open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    tok = folder / "tokenizer"
    tok.mkdir()
    # open_clip names the special tokens <start_of_text>/<end_of_text>; HF's CLIP vocab uses <|startoftext|>/...
    vocab = {{"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v
             for k, v in bpe.encoder.items()}
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    (tok / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fullsize")
    t0 = time.perf_counter()
    _random_sd15(root / "sd15-random.safetensors")
    config = root / "config"
    shutil.copytree(CONFIGS, config)
    _tokenizer_files(config)
    print(f"\nwrote random SD1.5 checkpoint in {time.perf_counter() - t0:.1f} s; {_rss()}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "latents": torch.randn(2, 4, 16, 16, generator=g),
        "t": torch.tensor([981, 21]),
        "context": torch.randn(2, 77, 768, generator=g),
        "image": torch.rand(1, 3, 128, 128, generator=g) * 2 - 1,
    }


@torch.no_grad()
def _ours(b: SDBundle, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "unet": b.unet(x["latents"], x["t"], x["context"]),
        "vae.decode": b.vae.decode(x["latents"][:1]),
        "vae.encode": b.vae.encode(x["image"]).mean,
        "text": b.encode_prompt(PROMPTS),
    }


@torch.no_grad()
def _theirs(pipe, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    emb, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {
        "unet": pipe.unet(x["latents"], x["t"], encoder_hidden_states=x["context"]).sample,
        "vae.decode": pipe.vae.decode(x["latents"][:1]).sample,
        "vae.encode": pipe.vae.encode(x["image"]).latent_dist.mean,
        "text": emb,
    }


def _compare(tag: str, ours: dict, theirs: dict) -> None:
    for k in theirs:
        err = rel_err(ours[k], theirs[k])
        print(f"{tag} {k}: rel_err {err:.2e}")
        assert ours[k].shape == theirs[k].shape and err <= TOL, f"{tag} {k}"


@pytest.mark.fullsize
def test_fullsize_single_file_and_diffusers_folder(work: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path = work / "sd15-random.safetensors"
    x = _inputs()
    t0 = time.perf_counter()
    ours = load(path)
    assert ours.family.name == "sd1"
    out_ours = _ours(ours, x)
    tokenizer = ours.tokenizer
    del ours  # keep one model mapped at a time (peak RAM)
    gc.collect()
    print(f"gbsd load + forward: {time.perf_counter() - t0:.1f} s; {_rss()}")

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(work / "config"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    # the tokenizers agree on ordinary text, so this also checks our Tokenizer against CLIPTokenizer
    assert torch.equal(tokenizer(PROMPTS), pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                                          truncation=True, return_tensors="pt").input_ids)
    out_theirs = _theirs(pipe, x)
    print(f"diffusers from_single_file + forward: {time.perf_counter() - t0:.1f} s; {_rss()}")
    _compare("single file: gbsd vs diffusers", out_ours, out_theirs)

    t0 = time.perf_counter()
    folder = work / "diffusers"
    pipe.save_pretrained(folder)
    del pipe
    gc.collect()
    from_folder = load(folder)
    assert from_folder.family.name == "sd1"
    _compare("diffusers folder: gbsd vs diffusers", _ours(from_folder, x), out_theirs)
    # and bit for bit the weights of the single file (both sides are file-backed maps: no RAM spent)
    original = read_state_dict(path)
    for name, prefix in PREFIXES.items():
        sd = getattr(from_folder, name).state_dict()
        assert {prefix + k for k in sd} == {k for k in original if k.startswith(prefix)}, name
        different = [k for k, t in sd.items() if not torch.equal(t, original[prefix + k])]
        assert not different, f"{name}: {len(different)} tensors differ after the diffusers round trip: {different[:3]}"
    print(f"save_pretrained + gbsd folder load + forward: {time.perf_counter() - t0:.1f} s; {_rss()}")
    print(f"peak RSS (incl. file-backed pages): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")


def test_sd2_single_file_family_from_name(tmp_path: Path) -> None:
    mods = tiny_modules(sd2=True)
    path = save_single_file(mods, tmp_path / "tiny-768-v.safetensors")
    b = load(path)
    assert b.family is SD2_768_V and b.family.prediction_type == "v_prediction"
    assert b.unet.config.upcast_attention and b.text_encoder.config.penultimate
    want, got = outputs(mods, 128), outputs(bundle_modules(b), 128)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert b.encode_prompt("a cat").shape == (1, 77, 128)
    with pytest.raises(ValueError, match="clip_skip"):
        b.encode_prompt("a cat", clip_skip=2)
    with pytest.raises(CheckpointError, match="expects a clip text encoder"):
        load(path, family="sd1")
