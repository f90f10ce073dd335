"""bench/prompt_chunks.py: the cross-attention FLOP estimate against the FLOP counter on the real step, and a tiny
run of the script."""
from __future__ import annotations

import json
import sys

from _util import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.flops import step_flops  # noqa: E402
from bench.models import ARCHS  # noqa: E402
from bench.prompt_chunks import attn2_flops, main  # noqa: E402


def test_the_attention_estimate_is_what_a_longer_context_adds_to_the_counted_step():
    """FlopCounterMode on the plain CFG step (meta device) with 231 context positions against 77: the difference is
    the attention products the script counts plus the K/V projections of the 154 extra positions, nothing else."""
    import torch

    with torch.device("meta"):
        from gbsd_core.attention_sites import attention_sites
        from gbsd_core.unet import UNetModel

        unet = UNetModel(ARCHS["sd15"].unet)
    counted = step_flops("sd15", False, 512, 1, 7.5, positions=231) - step_flops("sd15", False, 512, 1, 7.5)
    products = attn2_flops(unet, 512, 3) - attn2_flops(unet, 512, 1)
    kv = sum(2 * 2 * 2 * 154 * 768 * s.module.heads * s.module.dim_head for s in attention_sites(unet, cross=True))
    print(f"SD1.5 512²: 231 vs 77 positions add {counted / 1e9:.2f} GFLOP per CFG step "
          f"(attention products {products / 1e9:.2f}, K/V projections {kv / 1e9:.2f})")
    assert counted == products + kv
    assert round(attn2_flops(unet, 512, 1) / 1e9, 2) == 7.12  # by hand: 4·2·77·11,550,720 (README, Prompts)


def test_tiny_run(tmp_path, capsys):
    out = tmp_path / "chunks.json"
    assert main(["--tiny", "--size", "64", "--chunks", "1,3", "--repeat", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    for config in ("plain", "fast"):
        rows = record["configs"][config]
        assert set(rows) == {"1", "3"} and rows["1"]["x_first"] == 1.0 and len(rows["3"]["runs_s"]) == 1
    assert "k=3 ( 231 positions)" in capsys.readouterr().out
