"""Full-size SD1.5 / SD2.1 UNet parity against diffusers' UNet2DConditionModel, random seeded weights, fp32.

Our UNet is built once per architecture (module-scoped); the diffusers twin is built on the meta device and takes our
tensors (renamed by diffusers' own `convert_ldm_unet_checkpoint`) with assign=True, so the weights exist once in RAM.
Run under `flock /tmp/gbsd-fullsize.lock`.
"""
from __future__ import annotations

import gc

import pytest
import torch

from _reference import diffusers_unet
from _util import rel_err
from gbsd_core.unet import UNetConfig, UNetModel

pytestmark = pytest.mark.fullsize


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    cfg = getattr(UNetConfig, request.param)()
    torch.manual_seed(0)
    ours = UNetModel(cfg).eval()
    ref = diffusers_unet(ours, share=True)
    yield request.param, ours, ref
    del ours, ref
    gc.collect()


def _run(pair, h: int, w: int, timesteps: list[int]) -> float:
    name, ours, ref = pair
    g = torch.Generator().manual_seed(h * 100 + w)
    b = len(timesteps)
    x = torch.randn(b, 4, h, w, generator=g)
    ctx = torch.randn(b, 77, ours.config.context_dim, generator=g)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        a = ours(x, t, ctx)
        r = ref(x, t, encoder_hidden_states=ctx).sample
    assert a.shape == r.shape == x.shape
    err = rel_err(a, r)
    print(f"full-size {name} {h}x{w} t={timesteps} rel_err vs diffusers {err:.2e}")
    return err


def test_parity_16x16(pair):
    # Batch of 2 at two very different timesteps (one forward: the CPU budget of CI is small).
    assert _run(pair, 16, 16, [981, 1]) <= 1e-5


def test_parity_odd_size(pair):
    assert _run(pair, 13, 11, [741]) <= 1e-5
