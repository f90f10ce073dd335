"""Reading LoRA files (gbsd_core/lora/files.py): kohya .safetensors and .pt, every diffusers / PEFT spelling, alpha
and the PEFT metadata's scales, the hashes, the family hint, and the refusals (other adapters by name, bad tensors,
unknown formats, a pickle that wants to run code)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from _lora import kohya_state_dict, write

from gbsd_core.lora import load_lora
from gbsd_core.readers import CheckpointError

Q = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (64, 64))
CONV = ("down_blocks.0.resnets.0.conv1", (64, 64, 3, 3))
TE = ("text_model.encoder.layers.0.self_attn.q_proj", (64, 64))


def _kohya(alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    return kohya_state_dict([("lora_unet_", [Q, CONV]), ("lora_te_", [TE])], alpha=alpha)


def test_kohya_safetensors_and_pt_read_alike(tmp_path):
    sd = _kohya()
    a, b = load_lora(write(sd, tmp_path / "a.safetensors")), load_lora(write(sd, tmp_path / "a.pt"))
    assert a.format == b.format == "kohya" and a.name == "a" and a.parts() == ["te", "unet"] and a.ranks() == [4]
    for x, y in zip(a.modules, b.modules, strict=True):
        assert (x.part, x.name, x.scale) == (y.part, y.name, y.scale)
        assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up)
    conv = next(m for m in a.modules if m.name.endswith("conv1"))
    assert conv.part == "unet" and conv.name == "down_blocks_0_resnets_0_conv1" and tuple(conv.down.shape) == (4, 64, 3, 3)
    assert {m.scale for m in a.modules} == {0.5}  # alpha 2 / rank 4
    assert {m.scale for m in load_lora(write(_kohya(alpha=None), tmp_path / "b.safetensors")).modules} == {1.0}


def test_hashes_are_the_file_sha256_and_a1111s_addnet_hash(tmp_path):
    """sha256 of the whole file (gbsd's PNG chunk), and A1111's "Lora hashes" value: the first 12 hex digits of the
    sha256 of a .safetensors' tensor bytes (everything after the 8-byte length and the JSON header), so that editing
    the metadata keeps it; a `sshs_model_hash` in the metadata takes precedence, as in A1111."""
    path = write(_kohya(), tmp_path / "h.safetensors", metadata={"ss_output_name": "h"})
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    lora = load_lora(path)
    assert lora.sha256 == hashlib.sha256(raw).hexdigest()
    assert lora.a1111_hash == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]
    edited = load_lora(write(_kohya(), tmp_path / "h2.safetensors", metadata={"ss_output_name": "other name"}))
    assert edited.a1111_hash == lora.a1111_hash and edited.sha256 != lora.sha256
    given = load_lora(write(_kohya(), tmp_path / "h3.safetensors", metadata={"sshs_model_hash": "0123456789abcdef"}))
    assert given.a1111_hash == "0123456789ab"
    pt = load_lora(write(_kohya(), tmp_path / "h.pt"))
    assert pt.a1111_hash == pt.sha256[:12] == hashlib.sha256((tmp_path / "h.pt").read_bytes()).hexdigest()[:12]


def _peft(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kohya dict in PEFT's spelling."""
    out = {}
    for name, _ in (Q, CONV):
        k = "lora_unet_" + name.replace(".", "_")
        out[f"unet.{name}.lora_A.weight"], out[f"unet.{name}.lora_B.weight"] = sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"]
    k = "lora_te_" + TE[0].replace(".", "_")
    out[f"text_encoder.{TE[0]}.lora_A.weight"], out[f"text_encoder.{TE[0]}.lora_B.weight"] = (
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"])
    return out


def test_every_diffusers_spelling_names_the_same_modules(tmp_path):
    """PEFT (lora_A / lora_B), diffusers' LoRACompatible (`lora.down`), text `lora_linear_layer`, the attention
    processors' `processor.to_q_lora` (no part prefix), text modules without `text_model.`: the same modules, each
    spelled as kohya would (the lookup key)."""
    sd = _peft(_kohya())
    spellings = {
        "peft": sd,
        "lora.down": {k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
                      for k, v in sd.items()},
        "lora_linear_layer": {k.replace("lora_A.weight", "lora_linear_layer.down.weight")
                              .replace("lora_B.weight", "lora_linear_layer.up.weight"): v for k, v in sd.items()},
        "flat text": {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in sd.items()},
        "attn procs": {k.replace("unet.", "").replace("attn1.to_q.lora_A", "attn1.processor.to_q_lora.down")
                       .replace("attn1.to_q.lora_B", "attn1.processor.to_q_lora.up")
                       .replace("self_attn.q_proj.lora_A", "self_attn.to_q_lora.down")
                       .replace("self_attn.q_proj.lora_B", "self_attn.to_q_lora.up"): v for k, v in sd.items()},
    }
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight" in spellings["attn procs"]
    expected = {("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
                ("unet", "down_blocks_0_resnets_0_conv1"), ("text_encoder", "text_model_encoder_layers_0_self_attn_q_proj")}
    for what, variant in spellings.items():
        lora = load_lora(write(variant, tmp_path / f"{what.replace(' ', '_')}.safetensors"))
        names = {(m.part, m.name if what != "flat text" or m.part == "unet" else "text_model_" + m.name)
                 for m in lora.modules}
        assert lora.format == "diffusers" and names == expected, what
        assert {m.scale for m in lora.modules} == {1.0}, what  # no alpha, no metadata: diffusers' scale 1


def test_peft_metadata_gives_alpha_over_r_with_patterns(tmp_path):
    """diffusers' `lora_adapter_metadata`: scale = lora_alpha / r, alpha_pattern entries (PEFT regexes matched at the
    end of the module name) override it; rsLoRA divides by √r; `.alpha` keys are read as kohya's."""
    sd = _peft(_kohya())
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"resnets.0.conv1": 2},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 16, "text_encoder.use_rslora": True}
    lora = load_lora(write(sd, tmp_path / "m.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)}))
    scales = {m.name.split("_")[-1]: m.scale for m in lora.modules}
    assert scales == {"q": 8 / 4, "conv1": 2 / 4, "proj": 16 / 2}
    sd["unet.down_blocks.0.resnets.0.conv1.alpha"] = torch.tensor(1.0)
    lora = load_lora(write(sd, tmp_path / "a.safetensors"))
    assert {m.name.split("_")[-1]: m.scale for m in lora.modules} == {"q": 1.0, "conv1": 0.25, "proj": 1.0}


def test_family_hint_from_metadata_or_shapes(tmp_path):
    assert load_lora(write(_kohya(), tmp_path / "a.safetensors",
                           metadata={"ss_base_model_version": "sdxl_base_v1-0"})).family_hint() == "sdxl"
    assert load_lora(write(_kohya(), tmp_path / "b.safetensors", metadata={"ss_v2": "True"})).family_hint() == "sd2"
    k = [("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (320, 768))]
    assert load_lora(write(kohya_state_dict([("lora_unet_", k)]), tmp_path / "c.safetensors")).family_hint() == "sd1"
    xl = [("input_blocks.4.1.transformer_blocks.0.attn2.to_k", (640, 2048))]
    assert load_lora(write(kohya_state_dict([("lora_unet_", xl)]), tmp_path / "d.safetensors")).family_hint() == "sdxl"
    te2 = kohya_state_dict([("lora_te2_", [TE])])
    assert load_lora(write(te2, tmp_path / "e.safetensors")).family_hint() == "sdxl"
    assert load_lora(write(_kohya(), tmp_path / "f.safetensors")).family_hint() is None  # 64 wide: nobody's


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious .pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad(sd: dict, name: str = "bad.safetensors") -> dict:
    return {"sd": sd, "name": name}


KOHYA = "lora_unet_down_blocks_0_resnets_0_conv1"
BAD = {
    "LoHa": ({f"{KOHYA}.hada_w1_a": torch.zeros(64, 4), f"{KOHYA}.hada_w1_b": torch.zeros(4, 576)},
             r"LyCORIS LoHa: 1 module\(s\), e.g. lora_unet_down_blocks_0_resnets_0_conv1"),
    "LoKr": ({f"{KOHYA}.lokr_w1": torch.zeros(8, 8), f"{KOHYA}.lokr_w2": torch.zeros(8, 8)}, r"LyCORIS LoKr"),
    "DoRA": ({**kohya_state_dict([("lora_unet_", [Q])]),
              "lora_unet_" + Q[0].replace(".", "_") + ".dora_scale": torch.ones(1, 64)}, r"DoRA"),
    "PEFT DoRA": ({"unet.x.lora_A.weight": torch.zeros(4, 8), "unet.x.lora_B.weight": torch.zeros(8, 4),
                   "unet.x.lora_magnitude_vector": torch.ones(8)}, r"DoRA"),
    "full diff": ({f"{KOHYA}.diff": torch.zeros(64, 64, 3, 3)}, r"LyCORIS full"),
    "integer weights": ({f"{KOHYA}.lora_down.weight": torch.zeros(4, 64, dtype=torch.int32),
                         f"{KOHYA}.lora_up.weight": torch.zeros(64, 4)}, r"down \(int32, strided\) is not a floating-point weight"),
    "NaN": ({f"{KOHYA}.lora_down.weight": torch.full((4, 64), float("nan")),
             f"{KOHYA}.lora_up.weight": torch.zeros(64, 4)}, r"down holds 256 NaN and 0 inf"),
    "inf alpha": ({f"{KOHYA}.lora_down.weight": torch.zeros(4, 64), f"{KOHYA}.lora_up.weight": torch.zeros(64, 4),
                   f"{KOHYA}.alpha": torch.tensor(float("inf"))}, r"alpha is inf"),
    "ranks differ": ({f"{KOHYA}.lora_down.weight": torch.zeros(4, 64), f"{KOHYA}.lora_up.weight": torch.zeros(64, 8)},
                     r"shapes that do not multiply \(down \(4, 64\), up \(64, 8\)\)"),
    "no up": ({f"{KOHYA}.lora_down.weight": torch.zeros(4, 64)}, r"1 key groups are not kohya LoRA modules"),
    "unknown prefix": ({"lora_transformer_x.lora_down.weight": torch.zeros(4, 8),
                        "lora_transformer_x.lora_up.weight": torch.zeros(8, 4)}, r"not kohya LoRA modules.*lora_transformer_x"),
    "a checkpoint": ({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, r"not a LoRA file .*--weights"),
    "mixed": ({**kohya_state_dict([("lora_unet_", [Q])]), "other.weight": torch.zeros(2)}, r"mixes kohya keys"),
    "PEFT without B": ({"unet.x.lora_A.weight": torch.zeros(4, 8)}, r"unet.x has no up \(lora_B\) weight"),
    "empty": ({}, r"holds no tensors"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_files_are_refused_naming_the_problem(tmp_path, what):
    sd, message = BAD[what]
    path = write(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=message) as e:
        load_lora(path)
    print(f"{what}: {e.value}")
    assert str(path) in str(e.value)


def test_a_pt_that_wants_to_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_was_executed"
    torch.save({**_kohya(), "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*(os|posix)\.mkdir"):
        load_lora(tmp_path / "evil.pt")
    assert not marker.exists(), "the pickle's code ran"


def test_other_paths_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"unknown LoRA file type '.txt'"):
        load_lora(tmp_path / "x.txt")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_lora(tmp_path / "trunc.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(CheckpointError, match="is a named pipe"):
        load_lora(tmp_path / "pipe.safetensors")
