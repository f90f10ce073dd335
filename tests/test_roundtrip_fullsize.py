"""Full-size SD1.5 round trip with random weights (run under `flock /tmp/gbsd-fullsize.lock`).

A random SD1.5-shaped checkpoint written by our writer must load (1) in gbsd and (2) in diffusers'
`StableDiffusionPipeline.from_single_file` (offline, with the local config folder tests/configs/sd15), giving the
same UNet / VAE / text outputs; and (3) the diffusers `save_pretrained` folder of that pipeline must load in gbsd to
the very same weights and outputs. 16x16 latents keep it cheap; everything is file-backed (mmap), so RAM stays low.
"""
from __future__ import annotations

import gc
import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch

from _util import rel_err
from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.loading import PREFIXES, SDBundle, load, read_state_dict, save_single_file
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

pytestmark = pytest.mark.fullsize

TOL = 1e-5
CONFIGS = Path(__file__).parent / "configs" / "sd15"
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def _fill_(p: torch.Tensor, pool: torch.Tensor, g: torch.Generator) -> None:
    """Copy N(0, 1) values from a shared pool, starting at a random offset (wrapping around). Drawing 1.07 G
    normals takes ~20 s on two cores; copying from a 16 M pool takes ~2 s and still gives every tensor its own
    values, which is all a parity test needs."""
    flat, i = p.view(-1), 0
    off = int(torch.randint(0, pool.numel(), (1,), generator=g))
    while i < flat.numel():
        take = min(flat.numel() - i, pool.numel() - off)
        flat[i:i + take] = pool[off:off + take]
        i, off = i + take, 0


def _random_sd15(path: Path, seed: int = 0) -> None:
    """Build on meta, allocate uninitialised, fill with seeded fan-in-scaled noise, write, free."""
    with torch.device("meta"):
        modules = {"unet": UNetModel(UNetConfig.sd1()), "vae": AutoencoderKL(VAEConfig()),
                   "text_encoder": CLIPTextEncoder(CLIPTextConfig())}
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=g)
    with torch.no_grad():
        for name in modules:
            modules[name] = modules[name].to_empty(device="cpu")
            for pname, p in modules[name].named_parameters():
                _fill_(p, pool, g)
                if p.ndim >= 2:
                    p.mul_(p[0].numel() ** -0.5)
                elif "norm" in pname:
                    p.mul_(0.1).add_(1.0) if pname.endswith("weight") else p.mul_(0.1)
                else:
                    p.mul_(0.05)
    save_single_file(modules, path)
    del modules, p, pool
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
