"""The README's LoRA snippet runs (on the tiny checkpoint, with two tiny LoRAs in weights/loras)."""
from __future__ import annotations

import re

import torch
from _lora import kohya_state_dict, same_state, snapshot, write
from _util import REPO

import gbsd_core
from gbsd_core.pipeline import GenerationParams, generate


def test_readme_lora_snippet_runs(responsive_ckpt, tmp_path, monkeypatch):
    code = "\n".join(re.findall(r"```python lora\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S))
    assert "apply_loras(" in code and "switch=loras" in code
    bundle = gbsd_core.load(responsive_ckpt)
    unet = [(n, tuple(m.weight.shape)) for n, m in bundle.unet.named_modules() if isinstance(m, torch.nn.Linear)]
    (tmp_path / "weights" / "loras").mkdir(parents=True)
    for seed, name in enumerate(("watercolor", "detail")):
        write(kohya_state_dict([("lora_unet_", unet)], seed=seed), tmp_path / "weights" / "loras" / f"{name}.safetensors")
    monkeypatch.chdir(tmp_path)
    params = GenerationParams("a bunny and a carrot", focus="a carrot", steps=4, seed=1, width=64, height=64)
    before = snapshot(bundle.unet, bundle.text_encoder)
    exec(compile(code, "README.md", "exec"), {"bundle": bundle, "params": params, "generate": generate})
    assert (tmp_path / "lora.png").exists()
    assert same_state(before, bundle.unet, bundle.text_encoder)
