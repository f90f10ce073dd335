"""CPU weight prepacking (gbsd_core/prepack.py) against PyTorch's own nn.Conv2d / nn.Linear on the same weights.

Each test also checks the packed kernel really ran (its packer holds a packed weight), so a silent fallback to
the plain layer cannot pass for packing.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from _util import rel_err
from torch import nn

from gbsd_core.attention_sites import attention_sites
from gbsd_core.fast.attention import FastCrossAttention, swap_attention
from gbsd_core.fast.prepack import LINEAR_DTYPES, PackedConv2d, PackedLinear, prepack_, prepack_available
from gbsd_core.unet import UNetConfig, UNetModel

pytestmark = pytest.mark.skipif(not prepack_available(), reason="this PyTorch build has no oneDNN (mkldnn) ops")

CL = torch.channels_last
# (in, out, kernel, stride, padding): the UNet's 3x3 convs, its stride-2 downsample, the 1x1 skip / proj convs, and
# the VAE's unpadded stride-2 downsample
CONVS = [(16, 32, 3, 1, 1), (32, 32, 3, 2, 1), (32, 16, 1, 1, 0), (16, 16, 3, 2, 0)]


def _conv(spec, dtype, seed=0) -> nn.Conv2d:
    torch.manual_seed(seed)
    cin, cout, k, s, p = spec
    return nn.Conv2d(cin, cout, k, stride=s, padding=p).to(dtype)


@pytest.mark.parametrize("spec", CONVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_conv_matches_conv2d(spec, dtype, channels_last):
    ref = _conv(spec, dtype)
    x = torch.randn(2, spec[0], 12, 12).to(dtype)
    if channels_last:
        ref, x = ref.to(memory_format=CL), x.contiguous(memory_format=CL)
    packed = copy.deepcopy(ref)
    assert prepack_(packed) == 1 and type(packed) is PackedConv2d
    with torch.inference_mode():
        out, expected = packed(x), ref(x)
        exact = F.conv2d(x.double(), ref.weight.double(), ref.bias.double(), ref.stride, ref.padding)
    assert packed.packer.key is not None  # the oneDNN kernel ran
    err, err_plain = rel_err(out, exact), rel_err(expected, exact)
    print(f"{spec} {dtype} channels_last={channels_last}: packed {err:.2e}, nn.Conv2d {err_plain:.2e} vs fp64")
    assert out.shape == expected.shape and out.dtype == dtype
    # the same memory layout nn.Conv2d gives (oneDNN itself answers channels-last)
    assert out.is_contiguous(memory_format=CL) == expected.is_contiguous(memory_format=CL)
    assert out.is_contiguous() == expected.is_contiguous()
    assert err <= (1e-6 if dtype == torch.float32 else max(2 * err_plain, 4e-3))


@pytest.mark.parametrize("shape", [(300, 64), (2, 77, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_linear(shape, bias, dtype):
    if dtype not in LINEAR_DTYPES:
        pytest.skip("fp32 linear packing needs MKL (x86 builds)")
    torch.manual_seed(0)
    ref = nn.Linear(64, 96, bias=bias).to(dtype)
    packed = copy.deepcopy(ref)
    prepack_(packed)
    x = torch.randn(shape).to(dtype)
    with torch.inference_mode():
        out = packed(x)
        exact = F.linear(x.double(), ref.weight.double(), None if ref.bias is None else ref.bias.double())
        err, err_plain = rel_err(out, exact), rel_err(ref(x), exact)
        other = torch.randn(5, 64).to(dtype)  # another row count: packed again for it
        err_other = rel_err(packed(other), F.linear(other.double(), ref.weight.double(),
                                                    None if ref.bias is None else ref.bias.double()))
    assert type(packed) is PackedLinear and packed.packer.key[0] == 5
    print(f"{dtype} linear {shape} bias={bias}: packed {err:.2e}, F.linear {err_plain:.2e} vs fp64")
    assert out.shape == (*shape[:-1], 96) and out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else max(2 * err_plain, 4e-3)
    assert err <= tol and err_other <= tol


def test_packed_weight_follows_new_weights_and_input_shapes():
    ref = _conv(CONVS[0], torch.float32)
    packed = copy.deepcopy(ref)
    prepack_(packed)
    x = torch.randn(2, 16, 12, 12)
    with torch.inference_mode():
        packed(x)
    first = packed.packer.key
    # load_state_dict copies into the same parameter in place: only the version counter tells the weights changed
    new = _conv(CONVS[0], torch.float32, seed=1)
    packed.load_state_dict(new.state_dict())
    with torch.inference_mode():
        assert rel_err(packed(x), new(x)) <= 1e-6 and packed.packer.key != first
        y = torch.randn(1, 16, 7, 9)  # another input shape: packed again for it
        assert rel_err(packed(y), new(y)) <= 1e-6 and packed.packer.key[0] == (1, 16, 7, 9)
    # a cast makes new weight storage: repacked too
    packed.bfloat16(), new.bfloat16()
    with torch.inference_mode():
        assert rel_err(packed(x.bfloat16()), new(x.bfloat16())) <= 1e-2 and packed.packer.key[-2] == torch.bfloat16


def test_plain_path_where_packing_does_not_apply():
    ref = _conv(CONVS[0], torch.float32)
    packed = copy.deepcopy(ref)
    prepack_(packed)
    x = torch.randn(2, 16, 8, 8)
    # autograd: the packed ops have no backward, so a graph-building call takes the plain path, gradients included
    packed(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert packed.packer.key is None and torch.equal(packed.weight.grad, ref.weight.grad)
    # fp16 on CPU: no AMX-fp16 path, plain kernel, bit-identical
    half, half_ref = copy.deepcopy(packed).half(), copy.deepcopy(ref).half()
    with torch.inference_mode():
        assert torch.equal(half(x.half()), half_ref(x.half())) and half.packer.key is None
    lin, lin_ref = nn.Linear(16, 8).half(), nn.Linear(16, 8).half()
    lin_ref.load_state_dict(lin.state_dict())
    prepack_(lin)
    with torch.inference_mode():
        v = torch.randn(3, 16).half()
        assert torch.equal(lin(v), lin_ref(v)) and lin.packer.key is None


def test_packed_modules_copy_and_pickle_without_the_opaque_buffer():
    packed = _conv(CONVS[0], torch.float32)
    prepack_(packed)
    x = torch.randn(1, 16, 8, 8)
    with torch.inference_mode():
        expected = packed(x)
    buf = io.BytesIO()
    torch.save(packed, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(packed), torch.load(buf, weights_only=False)):
        assert type(clone) is PackedConv2d and clone.packer.key is None and clone.packer is not packed.packer
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)


def _tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2, 1),
                                num_heads=-1, num_head_channels=32, context_dim=48)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_unet_keeps_keys_and_matches_the_plain_unet(dtype):
    plain = _tiny_unet()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 48)
    with torch.inference_mode():
        exact = plain(x, t, c)
    plain = plain.to(dtype)
    packed = copy.deepcopy(plain)
    swap_attention(packed)
    for site in attention_sites(packed, cross=False):
        site.module.fuse_qkv()
    keys = {k: v.data_ptr() for k, v in packed.state_dict().items()}
    layers = sum(type(m) in (nn.Conv2d, nn.Linear) for m in packed.modules())
    assert prepack_(packed) == layers > 0 and prepack_(packed) == 0  # idempotent
    assert {k: v.data_ptr() for k, v in packed.state_dict().items()} == keys  # same keys, same tensors
    with torch.inference_mode():
        ours, theirs = packed(x.to(dtype), t, c.to(dtype)), plain(x.to(dtype), t, c.to(dtype))
    convs = [m for m in packed.modules() if isinstance(m, PackedConv2d)]
    assert all(m.packer.key is not None for m in convs)
    fused = [m.qkv_linear for m in packed.modules() if isinstance(m, FastCrossAttention) and m.qkv_weight is not None]
    assert fused and all((q.key is not None) == (dtype in LINEAR_DTYPES) for q in fused)
    err, err_plain = rel_err(ours, exact), rel_err(theirs, exact)
    print(f"tiny UNet {dtype}: prepacked {err:.2e}, plain {err_plain:.2e} vs the fp32 plain UNet")
    assert err <= (1e-5 if dtype == torch.float32 else 1.25 * err_plain + 1e-3)


