"""The in-place merge (gbsd_core/lora/merge.py): exact restore, changing sets without drift, LoCon's 3x3 and Tucker
convs against the runtime form, 1x1 convs against Linear LoRAs, nesting, and every refusal leaving the bundle's
weights untouched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _lora import kohya_state_dict, lora_pair, same_state, snapshot, write
from _util import rel_err

import gbsd_core
from gbsd_core.lora import LoraWeights, apply_loras, load_lora

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"  # tiny SD1 (conftest.tiny_ckpt): attention at both levels


@pytest.fixture(scope="module")
def bundle(responsive_ckpt):
    return gbsd_core.load(responsive_ckpt)


@pytest.fixture
def modules(bundle):
    return bundle.unet, bundle.text_encoder


def _unet_lora(tmp_path, bundle, name="u", seed=0, **kw):
    """A kohya LoRA on every Linear and Conv2d of the tiny UNet, named by their original (sgm) names."""
    groups = [("lora_unet_", [(n, tuple(m.weight.shape)) for n, m in bundle.unet.named_modules()
                              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))])]
    return load_lora(write(kohya_state_dict(groups, seed=seed, **kw), tmp_path / f"{name}.safetensors"))


def _text_lora(tmp_path, name="t", seed=5):
    groups = [("lora_te_", [(f"text_model.encoder.layers.{i}.{w}", (64, 64 if w != "mlp.fc1" else 64))
                            for i in range(2) for w in ("self_attn.q_proj", "self_attn.out_proj")])]
    return load_lora(write(kohya_state_dict(groups, seed=seed), tmp_path / f"{name}.safetensors"))


def test_the_bundle_is_byte_identical_after_the_block(bundle, modules, tmp_path):
    before = snapshot(*modules)
    lora, text = _unet_lora(tmp_path, bundle), _text_lora(tmp_path)
    with apply_loras(bundle, [(lora, 0.8), (text, -0.5)]) as applied:
        assert not same_state(before, *modules)
        assert applied.report.modules == len(lora.modules) + len(text.modules)
    assert same_state(before, *modules)


def test_changing_the_set_never_drifts(bundle, modules, tmp_path):
    """Set A, A+B, B at another scale, A again...: each state equals the same set merged once into the loaded
    weights (a fresh LoraWeights on a pristine copy), bit for bit: every change restores from the backup, never
    subtracts; weights whose sum did not change are not rewritten."""
    a, b = _unet_lora(tmp_path, bundle, "a", seed=1), _unet_lora(tmp_path, bundle, "b", seed=2, rank=2)
    sequence = [[(a, 0.7)], [(a, 0.7), (b, 1.0)], [(b, 0.3)], [(a, 0.7)], [(a, 0.7)], []]
    pristine = gbsd_core.load(bundle.path)
    before = snapshot(*modules)
    weights = LoraWeights(bundle)
    for uses in sequence:
        report = weights.set(uses)
        with apply_loras(pristine, uses):
            once = snapshot(pristine.unet)
        assert same_state(once, bundle.unet), uses
        if uses == sequence[3] and report.written:
            assert weights.set(uses).written == 0  # the same set again touches nothing
    assert same_state(before, *modules)


def test_the_listing_order_does_not_change_the_weights(bundle, modules, tmp_path):
    """W₀ + Σ scaleᵢ·ΔWᵢ is summed in one order (fp32 addition is not associative): the same LoRAs listed in another
    order -- a PNG's A1111 text puts flag LoRAs after the prompt's tags -- make the same bits."""
    a, b = _unet_lora(tmp_path, bundle, "a", seed=1), _unet_lora(tmp_path, bundle, "b", seed=2, std=0.3)
    with apply_loras(bundle, [(a, 0.7), (b, -0.3), (a, 0.2)]):
        first = snapshot(*modules)
    with apply_loras(bundle, [(b, -0.3), (a, 0.2), (a, 0.7)]):
        assert same_state(first, *modules)


def test_locon_3x3_and_tucker_convs_equal_the_runtime_form(bundle, tmp_path):
    """A LoCon on a ResBlock's 3x3 conv (padding 1) and on the stride-2 downsampler, as plain [r, in, 3, 3] down
    and as Tucker (1x1 down, [r, r, 3, 3] mid, 1x1 up): the merged conv equals A1111's un-merged forward,
    conv(x, W) + scale·(alpha/r)·up(mid(down(x))), computed layer by layer with the conv's stride and padding."""
    g = torch.Generator().manual_seed(3)
    convs = {"input_blocks.1.0.in_layers.2": bundle.unet.input_blocks[1][0].in_layers[2],
             "input_blocks.2.0.op": bundle.unet.input_blocks[2][0].op}
    for tucker in (False, True):
        sd = {}
        for name, conv in convs.items():
            for suffix, t in lora_pair(tuple(conv.weight.shape), g, rank=3, tucker=tucker, std=0.2).items():
                sd[f"lora_unet_{name.replace('.', '_')}.{suffix}"] = t
            sd[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(1.5)
        lora = load_lora(write(sd, tmp_path / f"locon{tucker}.safetensors"))
        x = torch.randn(2, 64, 16, 16, generator=g)
        for name, conv in convs.items():
            k = f"lora_unet_{name.replace('.', '_')}"
            stride, padding = conv.stride, conv.padding
            h = F.conv2d(x, sd[f"{k}.lora_down.weight"], stride=1 if tucker else stride, padding=0 if tucker else padding)
            if tucker:
                h = F.conv2d(h, sd[f"{k}.lora_mid.weight"], stride=stride, padding=padding)
            runtime = F.conv2d(x, conv.weight, conv.bias, stride, padding) + 0.6 * (1.5 / 3) * F.conv2d(h, sd[f"{k}.lora_up.weight"])
            with apply_loras(bundle, [(lora, 0.6)]):
                merged = conv(x)
            err = rel_err(merged, runtime)
            print(f"LoCon {'Tucker' if tucker else '3x3'} on {name}: merged vs runtime rel err {err:.1e}")
            assert err <= 1e-5 and rel_err(conv(x), runtime) > 1e-3


def test_a_linear_lora_fits_a_1x1_conv(bundle, tmp_path):
    """SD1's proj_in / proj_out are 1x1 convs, SD2's and SDXL's Linear: a file trained on either layout fits both."""
    conv = bundle.unet.input_blocks[1][1].proj_in
    sd = kohya_state_dict([("lora_unet_", [(f"{ATTN.rsplit('.', 2)[0]}.proj_in", (64, 64))])], seed=4)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 2
    lora = load_lora(write(sd, tmp_path / "p.safetensors"))
    before = conv.weight.detach().clone()
    with apply_loras(bundle, [(lora, 1.0)]):
        merged = conv.weight.detach().clone()
    up, down = sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], sd[
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert rel_err(merged, before + (0.5 * up @ down)[:, :, None, None]) <= 1e-6


def test_nested_blocks_restore_in_order(bundle, modules, tmp_path):
    before = snapshot(*modules)
    a, b = _unet_lora(tmp_path, bundle, "a", seed=1), _unet_lora(tmp_path, bundle, "b", seed=2)
    with apply_loras(bundle, [(a, 1.0)]):
        outer = snapshot(*modules)
        with apply_loras(bundle, [(b, 0.5)]):
            assert not same_state(outer, *modules)
        assert same_state(outer, *modules)
    assert same_state(before, *modules)


# ------------------------------------------------------------------------------------------------ refusals
def _xl_file(tmp_path):
    """An SDXL-style kohya file: sgm UNet names, CLIP-L (lora_te1_) and bigG (lora_te2_) modules."""
    groups = [("lora_unet_", [("input_blocks.4.1.transformer_blocks.0.attn2.to_k", (640, 2048))]),
              ("lora_te1_", [("text_model.encoder.layers.0.self_attn.q_proj", (768, 768))]),
              ("lora_te2_", [("text_model.encoder.layers.0.self_attn.q_proj", (1280, 1280))])]
    return load_lora(write(kohya_state_dict(groups), tmp_path / "xl.safetensors",
                           metadata={"ss_base_model_version": "sdxl_base_v1-0"}))


def test_refusals_leave_the_weights_untouched(bundle, modules, tiny_sdxl_ckpt, tmp_path):
    """Every refused set raises ValueError naming the problem before any weight changes (the state dict is
    bit-identical after each), SD1 and SDXL alike."""
    good = _unet_lora(tmp_path, bundle, "good")
    xl = gbsd_core.load(tiny_sdxl_ckpt)
    sd1_file = load_lora(write(kohya_state_dict([("lora_te_", [("text_model.encoder.layers.0.self_attn.q_proj",
                                                                (64, 64))])]), tmp_path / "sd1.safetensors"))
    stray = kohya_state_dict([("lora_unet_", [(f"{ATTN}.attn1.to_q", (64, 64)), ("down_blocks.7.resnets.0.conv1",
                                                                                   (64, 64, 3, 3)),
                                              ("mid_block.attentions.3.proj_in", (128, 128, 1, 1))])])
    shape = kohya_state_dict([("lora_unet_", [(f"{ATTN}.attn1.to_q", (64, 64)), (f"{ATTN}.attn2.to_k", (64, 768))])])
    cases = [
        (bundle, [(_xl_file(tmp_path), 1.0)], r"has modules for SDXL's CLIP-L \(lora_te1_\) and SDXL's bigG "
                                              r"\(lora_te2_\), which this model does not have \(it has SD1/SD2's one text "
                                              r"encoder \(lora_te_\)\): a LoRA for another model family "
                                              r"\(it looks made for SDXL"),
        (xl, [(sd1_file, 1.0)], r"has modules for SD1/SD2's one text encoder \(lora_te_\), which this model does not "
                                r"have \(it has SDXL's CLIP-L \(lora_te1_\), SDXL's bigG \(lora_te2_\)\)"),
        (bundle, [(load_lora(write(stray, tmp_path / "stray.safetensors")), 1.0)],
         r"2 of its 3 modules match no module of this model: lora_unet_down_blocks_7_resnets_0_conv1, "
         r"lora_unet_mid_block_attentions_3_proj_in"),
        (bundle, [(load_lora(write(shape, tmp_path / "shape.safetensors")), 1.0)],
         r"1 module\(s\) have the wrong shape for this model: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
         r"attn2_to_k makes \[64, 768\] for unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight \[64, 64\]"),
        (bundle, [(good, float("nan"))], r"scale must be a number in \[-10, 10\], got nan"),
        (bundle, [(good, True)], r"scale must be a number"),
        (bundle, [(good, 11.0)], r"scale must be a number in \[-10, 10\], got 11.0"),
        (bundle, [("weights/loras/x.safetensors", 1.0)], r"expected \(LoraFile, scale\) pairs, got a str"),
        (bundle, [(good, 0.5), (good, 0.5)], None),  # the same file twice is two LoRAs: allowed
    ]
    for b, uses, message in cases:
        before = snapshot(b.unet, b.text_encoder)
        if message is None:
            with apply_loras(b, uses):
                pass
        else:
            with pytest.raises(ValueError, match=message) as e:
                with apply_loras(b, uses):
                    pytest.fail("merged")
            print(e.value)
        assert same_state(before, b.unet, b.text_encoder), message
    # layout / focus sets are checked just as strictly, before anything is merged
    before = snapshot(*modules)
    with pytest.raises(ValueError, match="match no module"):
        apply_loras(bundle, [(good, 1.0)], focus=[(load_lora(tmp_path / "stray.safetensors"), 1.0)])
    assert same_state(before, *modules)


def test_an_overflowing_half_precision_merge_is_rolled_back(responsive_ckpt, tmp_path):
    """A fp16 model and a LoRA whose ΔW passes fp16's 65504: ValueError naming the weight, and the weights as before
    (the set merged earlier included)."""
    b = gbsd_core.load(responsive_ckpt, dtype=torch.float16)
    ok = _unet_lora(tmp_path, b, "ok", seed=1)
    huge = load_lora(write(kohya_state_dict([("lora_unet_", [(f"{ATTN}.ff.net.2", (64, 256))])], std=300.0),
                           tmp_path / "huge.safetensors"))
    weights = LoraWeights(b)
    weights.set([(ok, 1.0)])
    before = snapshot(b.unet, b.text_encoder)
    with pytest.raises(ValueError, match=r"merging huge, ok into unet.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight "
                                         r"overflows float16"):
        weights.set([(ok, 0.5), (huge, 1.0)])
    assert same_state(before, b.unet, b.text_encoder)
    weights.restore()
