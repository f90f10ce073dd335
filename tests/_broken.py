"""Checkpoints broken in one way each, for the loader's refusals (SD1 and SDXL files and folders).

tests/test_loading.py loads every one through the Python API (a `CheckpointError` naming the problem);
tests/cli/test_model_files.py runs `gbsd info` on every one (one line, exit 2, no traceback, no hang). Each case is
(id, builder, text the message must contain); a builder takes a `Workshop` and returns the path to load.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gbsd_core.clip_text import CLIPTextConfig, CLIPTextEncoder
from gbsd_core.loading import save_single_file
from gbsd_core.unet import UNetConfig, UNetModel
from gbsd_core.vae import AutoencoderKL, VAEConfig

# Parts that fit together (context = text width = 64, 64-wide heads, 4 latent channels); each case breaks one thing.
UNET = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=-1,
                  num_head_channels=64, context_dim=64)
VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TEXT = CLIPTextConfig(width=64, layers=1, heads=1)
UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VAE_KEY = "first_stage_model.decoder.conv_out.weight"
SDXL_UNET_KEY = "model.diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
SDXL_BIGG_KEY = "conditioner.embedders.1.model.token_embedding.weight"


@dataclass
class Workshop:
    tmp: Path
    good_folder: Path  # a diffusers folder that loads (tests/_tiny.py save_tiny_pipe)
    sdxl_folder: Path | None = None  # an SDXL base diffusers folder that loads (tests/_sdxl.py save_tiny_sdxl_pipe)

    def single(self, name: str = "m.safetensors", unet: UNetConfig = UNET, vae: VAEConfig = VAE,
               text: CLIPTextConfig = TEXT) -> Path:
        torch.manual_seed(0)
        mods = {"unet": UNetModel(unet), "vae": AutoencoderKL(vae), "text_encoder": CLIPTextEncoder(text)}
        return save_single_file(mods, self.tmp / name)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(load_file(str(self.single("base.safetensors"))))

    def edited(self, edit: Callable[[dict[str, torch.Tensor]], None], name: str = "e.safetensors",
               metadata: dict[str, str] | None = None) -> Path:
        sd = self.tensors()
        edit(sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(self.tmp / name), metadata=metadata)
        return self.tmp / name

    def ckpt(self, edit: Callable[[dict], None], name: str = "e.ckpt") -> Path:
        sd: dict = self.tensors()
        edit(sd)
        torch.save(sd, self.tmp / name)
        return self.tmp / name

    def folder(self, edit: Callable[[Path], None]) -> Path:
        out = self.tmp / "pipe"
        shutil.copytree(self.good_folder, out)
        edit(out)
        return out

    def sdxl(self, refiner_unet: bool = False, drop: str | None = None) -> Path:
        """A tiny SDXL base single file (tests/_sdxl.py), its UNet the refiner's if `refiner_unet`, without the
        tensor `drop`."""
        from _sdxl import tiny_sdxl_modules

        modules = tiny_sdxl_modules()
        if refiner_unet:
            modules["unet"] = tiny_sdxl_modules(refiner=True)["unet"]
        path = save_single_file(modules, self.tmp / "xl.safetensors")
        if drop is not None:
            sd = dict(load_file(str(path)))
            del sd[drop]
            save_file(sd, str(path))
        return path

    def sdxl_pipe(self, edit: Callable[[Path], None]) -> Path:
        if self.sdxl_folder is None:
            raise ValueError("this Workshop was made without an SDXL folder")
        out = self.tmp / "xl-pipe"
        shutil.copytree(self.sdxl_folder, out)
        edit(out)
        return out


def fifo(path: Path) -> Path:
    """A named pipe. Should the code under test open it, a helper opens the other end after a few seconds so the
    test fails (with the wrong message) instead of hanging forever."""
    os.mkfifo(path)

    def unblock() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only once a reader is waiting
                return
            except OSError:
                time.sleep(0.2)

    threading.Thread(target=unblock, daemon=True).start()
    return path


def _set(sd: dict, key: str, value: torch.Tensor) -> None:
    sd[key] = value


def _json(path: Path, value: object) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _edit_config(part: str, **changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        f = folder / part / "config.json"
        cfg = json.loads(f.read_text())
        cfg.update(changes)
        f.write_text(json.dumps(cfg))
    return edit


def _edit_scheduler(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        f = folder / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))
    return edit


def _replace_with_fifo(rel: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / rel).unlink()
        fifo(folder / rel)
    return edit


def _nan_at(key: str, value: float) -> Callable[[dict], None]:
    def edit(sd: dict) -> None:
        t = sd[key].clone()
        t.view(-1)[3] = value
        sd[key] = t
    return edit


def _drop_tensor(rel: str, key: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        sd = dict(load_file(str(folder / rel)))
        del sd[key]
        save_file(sd, str(folder / rel))
    return edit


def _dev_zero(w: Workshop) -> Path:
    (w.tmp / "zero.ckpt").symlink_to("/dev/zero")
    return w.tmp / "zero.ckpt"


BROKEN: list[tuple[str, Callable[[Workshop], Path], str]] = [
    # what the file is
    ("fifo-safetensors", lambda w: fifo(w.tmp / "pipe.safetensors"), "named pipe"),
    ("fifo-ckpt", lambda w: fifo(w.tmp / "pipe.ckpt"), "named pipe"),
    ("symlink-to-dev-zero", _dev_zero, "character device"),
    ("empty-safetensors", lambda w: (w.tmp / "e.safetensors").write_bytes(b"") or w.tmp / "e.safetensors",
     "not a readable safetensors"),
    # what the tensors are
    ("int8-in-float-slot", lambda w: w.edited(lambda sd: _set(sd, UNET_KEY, sd[UNET_KEY].to(torch.int8))), "int8"),
    ("bool-in-float-slot", lambda w: w.edited(lambda sd: _set(sd, VAE_KEY, sd[VAE_KEY] > 0)), "bool"),
    ("int64-in-float-slot", lambda w: w.edited(lambda sd: _set(sd, UNET_KEY, sd[UNET_KEY].long())), "int64"),
    ("ckpt-int-key", lambda w: w.ckpt(lambda sd: _set(sd, 1, torch.zeros(2))), "not strings"),
    ("ckpt-tuple-key", lambda w: w.ckpt(lambda sd: _set(sd, ("a", 1), torch.zeros(2))), "not strings"),
    ("ckpt-int8", lambda w: w.ckpt(lambda sd: _set(sd, UNET_KEY, sd[UNET_KEY].to(torch.int8))), "int8"),
    ("ckpt-meta-tensor", lambda w: w.ckpt(lambda sd: _set(sd, UNET_KEY, torch.empty(sd[UNET_KEY].shape,
                                                                                     device="meta"))), "no data"),
    ("ckpt-sparse-tensor", lambda w: w.ckpt(lambda sd: _set(sd, UNET_KEY, sd[UNET_KEY].to_sparse())), "sparse"),
    ("nan-in-unet", lambda w: w.edited(_nan_at(UNET_KEY, float("nan"))), "NaN"),
    ("inf-in-vae", lambda w: w.edited(_nan_at(VAE_KEY, float("inf"))), "inf"),
    ("nan-in-ckpt", lambda w: w.ckpt(_nan_at(UNET_KEY, float("nan"))), "NaN"),
    # parts that do not fit together
    ("unet-9-channels", lambda w: w.single(unet=replace(UNET, in_channels=9)), "9-channel"),
    ("cross-attention-width", lambda w: w.single(unet=replace(UNET, context_dim=128)), "cross-attention"),
    ("vae-16-channels", lambda w: w.single(vae=replace(VAE, z_channels=16, embed_dim=16)), "16-channel"),
    ("text-fewer-positions", lambda w: w.single(text=replace(TEXT, context_length=64)), "positions"),
    ("text-small-vocab", lambda w: w.single(text=replace(TEXT, vocab_size=1000)), "token ids"),
    ("vae-not-rgb", lambda w: w.single(vae=replace(VAE, out_ch=1)), "RGB"),
    ("sd1-says-v-prediction", lambda w: w.edited(lambda sd: None, metadata={"prediction_type": "v_prediction"}),
     "v_prediction"),
    ("prediction-type-unknown", lambda w: w.edited(lambda sd: None, metadata={"prediction_type": "sample"}),
     "prediction_type"),
    # diffusers folders: every config.json read and checked
    ("diffusers-config-is-list", lambda w: w.folder(lambda f: _json(f / "unet" / "config.json", [1, 2])),
     "JSON object"),
    ("diffusers-config-broken", lambda w: w.folder(lambda f: _json(f / "vae" / "config.json", '{"in_channels": 3')),
     "JSON"),
    ("diffusers-config-bad-type", lambda w: w.folder(_edit_config("unet", block_out_channels="abc")),
     "block_out_channels"),
    ("diffusers-config-bool-int", lambda w: w.folder(_edit_config("unet", layers_per_block=True)), "layers_per_block"),
    ("diffusers-norm-groups", lambda w: w.folder(_edit_config("unet", norm_num_groups=16)), "norm_num_groups"),
    ("diffusers-text-time-half-stated", lambda w: w.folder(_edit_config("unet", addition_embed_type="text_time")),
     "addition_time_embed_dim"),
    ("diffusers-config-vs-weights", lambda w: w.folder(_edit_config("unet", block_out_channels=[32, 128])),
     "does not match"),
    ("diffusers-text-act", lambda w: w.folder(_edit_config("text_encoder", hidden_act="relu")), "hidden_act"),
    ("diffusers-text-eps", lambda w: w.folder(_edit_config("text_encoder", layer_norm_eps=1e-6)), "layer_norm_eps"),
    ("diffusers-vae-shift", lambda w: w.folder(_edit_config("vae", shift_factor=0.1)), "shift_factor"),
    ("diffusers-vae-scaling-str", lambda w: w.folder(_edit_config("vae", scaling_factor="x")), "scaling_factor"),
    # a positive, finite factor no VAE has: the decoder divides by it (1e-30 -> inf latents -> black pixels)
    ("diffusers-vae-scaling-tiny", lambda w: w.folder(_edit_config("vae", scaling_factor=1e-30)), "scaling_factor"),
    ("diffusers-vae-scaling-huge", lambda w: w.folder(_edit_config("vae", scaling_factor=1e6)), "scaling_factor"),
    ("diffusers-scheduler-is-list",
     lambda w: w.folder(lambda f: _json(f / "scheduler" / "scheduler_config.json", [])), "JSON object"),
    ("diffusers-prediction-sample",
     lambda w: w.folder(lambda f: _json(f / "scheduler" / "scheduler_config.json", {"prediction_type": "sample"})),
     "prediction_type"),
    # scheduler_config.json: every option a schedule is built from, or refused by name (tests/test_noise_schedule.py)
    ("diffusers-scheduler-cosine", lambda w: w.folder(_edit_scheduler(beta_schedule="squaredcos_cap_v2")),
     "beta_schedule 'squaredcos_cap_v2' is not one gbsd builds"),
    ("diffusers-scheduler-unknown-key", lambda w: w.folder(_edit_scheduler(snr_shift_scale=3.0)), "'snr_shift_scale'"),
    ("diffusers-scheduler-clip-sample", lambda w: w.folder(_edit_scheduler(clip_sample=True)), "clip_sample"),
    ("diffusers-scheduler-zero-snr-epsilon", lambda w: w.folder(_edit_scheduler(rescale_betas_zero_snr=True)),
     "rescale_betas_zero_snr is true with prediction_type 'epsilon'"),
    ("diffusers-scheduler-trained-betas", lambda w: w.folder(_edit_scheduler(trained_betas=[0.001] * 1000)),
     "trained_betas"),
    ("diffusers-scheduler-edm", lambda w: w.folder(_edit_scheduler(_class_name="EDMEulerScheduler")), "_class_name"),
    ("diffusers-scheduler-huge-T", lambda w: w.folder(_edit_scheduler(num_train_timesteps=10**9)),
     "num_train_timesteps"),
    ("diffusers-scheduler-beta-one", lambda w: w.folder(_edit_scheduler(beta_end=1.5)), "beta_end"),
    ("diffusers-scheduler-continuous-time", lambda w: w.folder(_edit_scheduler(timestep_type="continuous")),
     "timestep_type"),
    ("diffusers-scheduler-learned-variance", lambda w: w.folder(_edit_scheduler(variance_type="learned_range")),
     "variance_type"),
    ("diffusers-weights-fifo", lambda w: w.folder(_replace_with_fifo("unet/diffusion_pytorch_model.safetensors")),
     "named pipe"),
    ("diffusers-config-fifo", lambda w: w.folder(_replace_with_fifo("text_encoder/config.json")), "named pipe"),
    ("diffusers-scheduler-fifo", lambda w: w.folder(_replace_with_fifo("scheduler/scheduler_config.json")),
     "named pipe"),
    # SDXL: single files (sgm's conditioner.*) and folders (text_encoder_2/)
    ("sdxl-missing-unet-tensor", lambda w: w.sdxl(drop=SDXL_UNET_KEY), f"1 missing keys: {SDXL_UNET_KEY}"),
    ("sdxl-missing-tower-tensor", lambda w: w.sdxl(drop=SDXL_BIGG_KEY), f"missing key {SDXL_BIGG_KEY}"),
    ("sdxl-refiner-unet-base-conditioner", lambda w: w.sdxl(refiner_unet=True), "do not fit together"),
    ("diffusers-sdxl-text-encoder-with-sd1-unet",
     lambda w: w.folder(lambda f: shutil.copytree(w.sdxl_folder / "text_encoder_2", f / "text_encoder_2")),
     "do not fit together"),
    ("diffusers-sdxl-unet-with-sd1-text-encoder",
     lambda w: w.sdxl_pipe(lambda f: shutil.rmtree(f / "text_encoder_2")), "vector y"),
    ("diffusers-sdxl-te2-not-gelu", lambda w: w.sdxl_pipe(_edit_config("text_encoder_2", hidden_act="quick_gelu")),
     "exact gelu"),
    # a width of the size sinusoids that the UNet's label embedding does not take (8 is fine where it does)
    ("diffusers-sdxl-time-dim", lambda w: w.sdxl_pipe(_edit_config("unet", addition_time_embed_dim=8)),
     "6 size values x 8, diffusers' addition_time_embed_dim"),
    ("diffusers-sdxl-time-embedding-dim", lambda w: w.sdxl_pipe(_edit_config("unet", time_embedding_dim=64)),
     "time_embedding_dim is 64; SD's UNet embeds the timestep in 4 x block_out_channels[0] = 128"),
    ("diffusers-mid-block-scale", lambda w: w.folder(_edit_config("unet", mid_block_scale_factor=2)),
     "mid_block_scale_factor"),
    ("diffusers-sdxl-vae-scaling-tiny", lambda w: w.sdxl_pipe(_edit_config("vae", scaling_factor=1e-30)),
     "scaling_factor"),
    ("diffusers-sdxl-missing-tensor", lambda w: w.sdxl_pipe(_drop_tensor("unet/diffusion_pytorch_model.safetensors",
                                                                         "add_embedding.linear_1.weight")),
     "1 missing keys: model.diffusion_model.label_emb.0.0.weight"),
]
