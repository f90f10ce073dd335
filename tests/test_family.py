"""Model families (gbsd_core/family.py): SD1 vs SD2 from the keys, SD2 512-eps vs 768-v from the hints outside them."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from gbsd_core.family import SD1, SD2_512, SD2_768_V, detect


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


# ------------------------------------------------------------------------------------------------ families
SD1_KEYS = ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"]

SD2_KEYS = ["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"]


def test_the_largest_size_is_four_times_the_native_side() -> None:
    assert (SD1.max_size, SD2_512.max_size, SD2_768_V.max_size) == (2048, 2048, 3072)


def test_prediction_types_that_no_family_has_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="v_prediction"):  # an SD1 (CLIP) model has no v-prediction family
        detect(SD1_KEYS, f, prediction_type="v_prediction")
    for bad in ("sample", "", "V_PREDICTION"):
        with pytest.raises(ValueError, match="prediction_type"):
            detect(SD2_KEYS, f, prediction_type=bad)
    assert detect(SD1_KEYS, f, prediction_type="epsilon") is SD1
