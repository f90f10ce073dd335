"""A config's counts are compared with the block indices in the weight keys before any module is built
(gbsd_core/block_counts.py): no config or stray key makes the loader build a million layers.

The class, not three inputs: every integer (and list of integers) in every config.json of a tiny SD1 and a tiny SDXL
diffusers folder is set to 10**6 in turn, and every kind of count a single file's shapes are inferred from gets a
stray key at index 10**6. Each load must end, within a deadline, in a refusal or in exactly the model the unedited
folder gives (a key gbsd does not read changes nothing). Before the check, `transformer_layers_per_block`,
`num_hidden_layers` and `layers_per_block` of 10**6 never returned (the modules were built on the meta device, layer by
layer, before the weights were compared).
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _tiny import save_tiny_pipe
from safetensors.torch import load_file, save_file

from gbsd_core.block_counts import check_block_counts, indices
from gbsd_core.loading import CheckpointError, inspect_checkpoint
from gbsd_core.unet import UNetConfig

HUGE = 10**6
# The integer options a folder may carry that decide nothing gbsd builds or runs, and why.
NOT_READ = {
    # the tokenizer's ids: gbsd tokenizes with CLIP's BPE (start 49406, end 49407), whatever a config says
    *(f"{part}.{key}" for part in ("text_encoder", "text_encoder_2")
      for key in ("bos_token_id", "eos_token_id", "pad_token_id")),
    "text_encoder.projection_dim",  # a CLIPTextModel (SD1, SDXL's CLIP-L) has no projection; bigG's is read
    "unet.addition_embed_type_num_heads",  # used by the "text" added embedding only; gbsd takes "text_time" alone
    "vae.sample_size",  # the tile size of diffusers' tiled VAE decode
}
DEADLINE_S = 20  # a refused or accepted load of these tiny folders takes well under a second


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts the Python loop that builds the modules."""
    def expired(signum, frame):
        raise TimeoutError(f"still loading after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory) -> Path:
    return save_tiny_pipe(tmp_path_factory.mktemp("counts") / "tiny-sd")


def _integer_keys(folder: Path) -> list[tuple[str, str]]:
    """(component, key) of every integer or list-of-integers value in the folder's model configs."""
    out = []
    for cfg in sorted(folder.glob("*/config.json")):
        for key, value in json.loads(cfg.read_text()).items():
            ints = [value] if not isinstance(value, list) else value
            if ints and all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                out.append((cfg.parent.name, key))
    return out


def _huge(folder: Path, part: str, key: str, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    f = out / part / "config.json"
    cfg = json.loads(f.read_text())
    cfg[key] = [HUGE] * len(cfg[key]) if isinstance(cfg[key], list) else HUGE
    f.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_every_integer_of_every_config_is_checked_before_anything_is_built(which, sd_pipe, sdxl_pipe, tmp_path):
    folder = sd_pipe if which == "sd" else sdxl_pipe
    original = inspect_checkpoint(folder)
    reference = (original.configs, original.native_size)
    cases = _integer_keys(folder)
    assert len(cases) > 25, cases  # the unet's, vae's and text encoders' counts, widths, sizes and token ids
    refused, unchanged = [], []
    for part, key in cases:
        path = _huge(folder, part, key, tmp_path / "edited")
        start = time.perf_counter()
        with deadline(DEADLINE_S):
            try:
                edited = inspect_checkpoint(path)
            except CheckpointError as e:
                refused.append(f"{part}.{key}")
                print(f"{part}.{key} = 10**6: refused in {time.perf_counter() - start:.2f} s: {str(e)[:160]}")
                continue
        # accepted: then the key is one gbsd does not read, and the model is the unedited folder's
        assert (edited.configs, edited.native_size) == reference, f"{part}.{key} = 10**6 changed the model"
        unchanged.append(f"{part}.{key}")
    print(f"{which}: {len(refused)} refused, accepted as not read: {unchanged}")
    assert set(unchanged) <= NOT_READ, set(unchanged) - NOT_READ
    for must in ("unet.layers_per_block", "vae.layers_per_block", "text_encoder.num_hidden_layers",
                 "unet.block_out_channels", "vae.block_out_channels"):
        assert must in refused
    if which == "sdxl":
        assert {"unet.transformer_layers_per_block", "text_encoder_2.num_hidden_layers"} <= set(refused)


STRAY = [  # (file fixture, a key at index 10**6 in the place whose count the shapes are inferred from)
    ("tiny_ckpt", "cond_stage_model.transformer.text_model.encoder.layers.1000000.layer_norm1.weight"),
    ("tiny_ckpt", "first_stage_model.encoder.down.0.block.1000000.norm1.weight"),
    ("tiny_ckpt", "first_stage_model.decoder.up.0.block.1000000.norm1.weight"),
    ("tiny_ckpt", "model.diffusion_model.middle_block.1.transformer_blocks.1000000.norm1.weight"),
    ("tiny_ckpt", "model.diffusion_model.input_blocks.1000000.0.in_layers.0.weight"),
    ("tiny_sdxl_ckpt", "conditioner.embedders.1.model.transformer.resblocks.1000000.ln_1.weight"),
    ("tiny_sdxl_ckpt", "conditioner.embedders.0.transformer.text_model.encoder.layers.1000000.layer_norm1.weight"),
]


@pytest.mark.parametrize("fixture, key", STRAY, ids=[k.split(".", 1)[1][:60] for _, k in STRAY])
def test_a_stray_block_index_in_a_single_file_is_refused_not_built(fixture, key, request, tmp_path):
    sd = dict(load_file(str(request.getfixturevalue(fixture))))
    sd[key] = torch.ones(4)
    path = tmp_path / "stray.safetensors"
    save_file(sd, str(path))
    with deadline(DEADLINE_S), pytest.raises(CheckpointError) as e:
        inspect_checkpoint(path)
    print(e.value)
    assert re.search("100000[01]|not recognised", str(e.value))


def test_indices_and_messages():
    sd = {f"input_blocks.{i}.0.weight": torch.zeros(1) for i in (0, 1, 2, 3)}
    assert indices(sd, "input_blocks") == [0, 1, 2, 3] and indices(sd, "output_blocks") == []
    cfg = UNetConfig(model_channels=8, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(),
                     num_heads=1, context_dim=8)
    with pytest.raises(ValueError, match=r"builds 2 levels .* hold 1 \(a Downsample"):
        check_block_counts(cfg, sd)
    with pytest.raises(TypeError):
        check_block_counts(object(), sd)
