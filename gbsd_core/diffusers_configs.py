"""diffusers component configs (each folder's config.json) -> our configs: the config half of the conversion seam
(diffusers_layout.py maps the names).

What shapes cannot say -- head counts, the MLP width of small towers, the VAE's scaling factor, the width of SDXL's
vector y, the noise schedule -- comes from the config. Every option our modules do not have must keep SD's value, or the folder is
refused naming the option (`UNET_FIXED`, `VAE_FIXED`, `TEXT_FIXED`); a value of the wrong type is refused too, so a
config.json is checked strictly before any weights are read. Defaults are the diffusers / transformers defaults a
missing key means.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .clip_text import CLIPTextConfig
from .noise_schedule import NoiseSchedule
from .openclip_text import OpenCLIPTextConfig
from .unet import UNetConfig
from .vae import VAEConfig, check_scale_factor

# Options of diffusers' UNet2DConditionModel that gbsd's UNet (openaimodel's, as SD uses it) does not have: a folder
# may state them only with SD's value (absent means diffusers' default, which is SD's).
UNET_FIXED: Mapping[str, Any] = MappingProxyType({
    "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None, "num_class_embeds": None, "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "cross_attention_norm": None, "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
    "mid_block_scale_factor": 1,  # diffusers divides the middle ResBlocks' output by it; sgm's ResBlock does not
    # SDXL's "text_time" added embedding is sgm's label_emb: checked by _added_embedding
})
# Reviewed and left fixed: sgm's openaimodel could also build resnet_time_scale_shift "scale_shift"
# (use_scale_shift_norm), only_cross_attention (disable_self_attentions), per-level layers_per_block and
# num_class_embeds (class labels, which no SD pipeline passes), but no SD1/SD2/SDXL model uses them, and building them
# would put branches on the core's plain SD path. Built where diffusers accepts a value sgm builds: any
# addition_time_embed_dim, time_embedding_dim stated as its default.
# AutoencoderKL options with no counterpart in CompVis' KL autoencoder (SD3/Flux VAEs set the shift and drop the
# quant convs).
VAE_FIXED: Mapping[str, Any] = MappingProxyType({
    "norm_num_groups": 32, "act_fn": "silu", "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True, "latents_mean": None, "latents_std": None,
})
TEXT_FIXED: Mapping[str, Any] = MappingProxyType({"layer_norm_eps": 1e-5})

# Options the diffusers / transformers classes take that decide nothing gbsd builds or runs, and why; every other
# option is translated above or must keep SD's value (tests/test_diffusers_layout_sdxl.py holds these lists against
# the classes' own signatures, so an option a new diffusers version adds is reviewed, not silently dropped).
UNET_NOT_READ: Mapping[str, str] = MappingProxyType({
    "dropout": "inference runs without dropout",
    "addition_embed_type_num_heads": "used by the 'text' added embedding only; gbsd builds 'text_time' alone",
    "mid_block_only_cross_attention": "read by UNetMidBlock2DSimpleCrossAttn only; SD's mid block type is fixed",
})
VAE_NOT_READ: Mapping[str, str] = MappingProxyType({
    "force_upcast": "a precision hint: gbsd decodes in fp32 unless asked (FastOptions.vae_dtype)",
    "sample_size": "the tile size of diffusers' tiled decode",
})
TEXT_NOT_READ: Mapping[str, str] = MappingProxyType({
    **{key: "transformers' bookkeeping and runtime switches (PretrainedConfig)" for key in (
        "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
        "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type")},
    "attention_dropout": "inference runs without dropout",
    "initializer_range": "initialisation only", "initializer_factor": "initialisation only",
    **{key: "the tokenizer's ids: gbsd tokenizes with CLIP's BPE (start 49406, end 49407)" for key in (
        "pad_token_id", "bos_token_id", "eos_token_id")},
    "projection_dim": "a CLIPTextModel has no projection (read for text_encoder_2, bigG's pooled vector)",
})


def _fixed(cfg: Mapping[str, Any], table: Mapping[str, Any]) -> None:
    for key, want in table.items():
        if key in cfg and cfg[key] != want:
            raise ValueError(f"{key} is {cfg[key]!r}; gbsd builds what SD has ({want!r})")


def _int(cfg: Mapping[str, Any], key: str, default: int, lo: int = 1) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    return v


def _ints(cfg: Mapping[str, Any], key: str, default: Any, levels: int | None = None) -> tuple[int, ...]:
    """An int or a list of ints (one per level): a tuple, `levels` long when given."""
    v = cfg.get(key, default)
    if levels is not None and isinstance(v, int) and not isinstance(v, bool):
        v = [v] * levels
    if (not isinstance(v, (list, tuple)) or not v or levels is not None and len(v) != levels
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)):
        n = f"{levels} " if levels is not None else ""
        raise ValueError(f"{key} must be a list of {n}positive integers, got {v!r}")
    return tuple(v)


def _strs(cfg: Mapping[str, Any], key: str, default: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    v = cfg.get(key, default)
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{key} must be a list of block names, got {v!r}")
    bad = [x for x in v if x not in allowed]
    if bad:
        raise ValueError(f"{key} has {bad[0]!r}; gbsd builds {' and '.join(allowed)} blocks")
    return tuple(v)


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def _same(key: str, values: tuple[int, ...]) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"{key} {list(values)} differs between levels; gbsd's UNet uses one value for all")
    return values[0]


def unet_config(cfg: Mapping[str, Any]) -> UNetConfig:
    """diffusers UNet2DConditionModel config.json -> UNetConfig (defaults: diffusers')."""
    _fixed(cfg, UNET_FIXED)
    only_cross = cfg.get("only_cross_attention", False)
    if only_cross is True or isinstance(only_cross, list) and any(only_cross):
        raise ValueError(f"only_cross_attention is {only_cross!r}; SD's transformer blocks have self-attention")
    channels = _ints(cfg, "block_out_channels", (320, 640, 1280, 1280))
    levels = len(channels)
    down = _strs(cfg, "down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 ("CrossAttnDownBlock2D", "DownBlock2D"))
    up = _strs(cfg, "up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, ("CrossAttnUpBlock2D", "UpBlock2D"))
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    mirrored = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    if len(down) != levels or up != mirrored:
        raise ValueError(f"down_block_types {list(down)} / up_block_types {list(up)} do not match the "
                         f"{levels} levels of block_out_channels mirrored (expected up {list(mirrored)})")
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ValueError(f"block_out_channels {list(channels)} are not multiples of the first")
    # diffusers' attention_head_dim is a head *count* (a long-standing misnomer); num_attention_heads, when set,
    # is the same thing under its right name. Per level; the mid block uses the last level's.
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    heads = _ints(cfg, heads_key, 8, levels)
    used = [i for i in range(levels) if attn[i]] + [levels - 1]
    if any(channels[i] % heads[i] for i in used):
        raise ValueError(f"{heads_key} {list(heads)} does not divide block_out_channels {list(channels)}")
    counts, widths = {heads[i] for i in used}, {channels[i] // heads[i] for i in used}
    if len(counts) == 1:
        num_heads, num_head_channels = counts.pop(), -1
    elif len(widths) == 1:
        num_heads, num_head_channels = -1, widths.pop()
    else:
        raise ValueError(f"{heads_key} {list(heads)}: head counts that are neither the same on every level nor of "
                         "the same width are not what SD's UNet builds")
    depths = _ints(cfg, "transformer_layers_per_block", 1, levels)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim is not None and time_dim != 4 * mc:  # None: diffusers' default, 4 x block_out_channels[0], as sgm's
        raise ValueError(f"time_embedding_dim is {time_dim!r}; SD's UNet embeds the timestep in 4 x "
                         f"block_out_channels[0] = {4 * mc} channels")
    return UNetConfig(
        in_channels=_int(cfg, "in_channels", 4), out_channels=_int(cfg, "out_channels", 4), model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=_same("layers_per_block", _ints(cfg, "layers_per_block", 2, levels)),
        attention_resolutions=tuple(2**i for i in range(levels) if attn[i]),
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=_int(cfg, "cross_attention_dim", 1280),
        use_linear_in_transformer=_flag(cfg, "use_linear_projection", False),
        transformer_depth=depths,  # per level (the mid block takes the last level's, as in diffusers)
        adm_in_channels=_added_embedding(cfg),
        upcast_attention=_flag(cfg, "upcast_attention", False),
    )


def _added_embedding(cfg: Mapping[str, Any]) -> int | None:
    """The width of SDXL's vector y (UNetConfig.adm_in_channels), or None for SD1/SD2.

    diffusers' `addition_embed_type: "text_time"` is sgm's label embedding of y = [pooled text ; size embeddings]:
    each size value goes through a sinusoid `addition_time_embed_dim` wide (ConcatTimestepEmbedderND's outdim, 256 in
    SDXL 1.0; `unet_micro_dim` hands it to the conditioner), and `projection_class_embeddings_input_dim` is the width
    of y (that the two agree with the text encoder is bundle.check_parts_fit's).
    """
    kind, time_dim = cfg.get("addition_embed_type"), cfg.get("addition_time_embed_dim")
    width = cfg.get("projection_class_embeddings_input_dim")
    if kind is None:
        for key, value in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim", width)):
            if value is not None:
                raise ValueError(f"{key} is {value!r} without an addition_embed_type; SD's UNet has no added "
                                 "embedding and SDXL's is 'text_time'")
        return None
    if kind != "text_time":
        raise ValueError(f"addition_embed_type is {kind!r}; gbsd builds SD's UNet (none) and SDXL's ('text_time')")
    _int(cfg, "addition_time_embed_dim", None)
    if width is None:
        raise ValueError("addition_embed_type 'text_time' needs projection_class_embeddings_input_dim (the width of "
                         "the pooled text and size embeddings)")
    return _int(cfg, "projection_class_embeddings_input_dim", 0)


def unet_micro_dim(cfg: Mapping[str, Any]) -> int | None:
    """SDXL's micro-conditioning width (addition_time_embed_dim) of a "text_time" UNet config (checked by
    `unet_config`), None for SD1/SD2."""
    return cfg["addition_time_embed_dim"] if cfg.get("addition_embed_type") == "text_time" else None


def unet_sample_size(cfg: Mapping[str, Any]) -> int | None:
    """The latent side the UNet was trained at (diffusers' default image size is this x the VAE factor), if stated."""
    v = cfg.get("sample_size")
    if isinstance(v, list) and len(v) == 2 and v[0] == v[1]:
        v = v[0]
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None


def vae_config(cfg: Mapping[str, Any]) -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig, the scaling factor included (defaults: diffusers')."""
    _fixed(cfg, VAE_FIXED)
    channels = _ints(cfg, "block_out_channels", (64,))
    down = _strs(cfg, "down_block_types", ("DownEncoderBlock2D",), ("DownEncoderBlock2D",))
    up = _strs(cfg, "up_block_types", ("UpDecoderBlock2D",), ("UpDecoderBlock2D",))
    if len(down) != len(channels) or len(up) != len(channels):
        raise ValueError(f"down_block_types / up_block_types must have one block per block_out_channels entry "
                         f"({len(channels)})")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {list(channels)} are not multiples of the first")
    scale = cfg.get("scaling_factor", 0.18215)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scaling_factor must be a positive number, got {scale!r}")
    check_scale_factor(scale, "scaling_factor")
    latent = _int(cfg, "latent_channels", 4)
    return VAEConfig(ch=ch, ch_mult=tuple(c // ch for c in channels), num_res_blocks=_int(cfg, "layers_per_block", 1),
                     z_channels=latent, embed_dim=latent, in_channels=_int(cfg, "in_channels", 3),
                     out_ch=_int(cfg, "out_channels", 3), scale_factor=float(scale))


def _text_common(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every text tower shares, from a transformers CLIPTextConfig (defaults: transformers')."""
    _fixed(cfg, TEXT_FIXED)
    width, heads = _int(cfg, "hidden_size", 512), _int(cfg, "num_attention_heads", 8)
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    return dict(vocab_size=_int(cfg, "vocab_size", 49408), width=width, layers=_int(cfg, "num_hidden_layers", 12),
                heads=heads, context_length=_int(cfg, "max_position_embeddings", 77),
                mlp_ratio=_int(cfg, "intermediate_size", 2048) / width)


def text_encoder_config(cfg: Mapping[str, Any]) -> CLIPTextConfig | OpenCLIPTextConfig:
    """SD1/SD2's `text_encoder`: transformers CLIPTextConfig (config.json) -> our CLIP (quick_gelu: SD1) or OpenCLIP
    (gelu: SD2) config.

    SD2's folder holds OpenCLIP-H converted to a CLIPTextModel, its last block already dropped, so all of it runs
    (penultimate=False), and it has neither projection nor logit_scale.
    """
    common = _text_common(cfg)
    act = cfg.get("hidden_act", "quick_gelu")
    if act == "quick_gelu":
        return CLIPTextConfig(**common)
    if act == "gelu":
        return OpenCLIPTextConfig(**common, penultimate=False, has_projection=False, has_logit_scale=False)
    raise ValueError(f"hidden_act {act!r} is not one of SD's text encoders (quick_gelu: SD1's CLIP, gelu: SD2's "
                     "OpenCLIP)")


def clip_l_config(cfg: Mapping[str, Any]) -> CLIPTextConfig:
    """SDXL base's `text_encoder`: the CLIP ViT-L/14 text model of SD1 (a CLIPTextModel, quick_gelu)."""
    common = _text_common(cfg)
    act = cfg.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"hidden_act is {act!r}; SDXL's first text encoder is OpenAI's CLIP ViT-L (quick_gelu)")
    return CLIPTextConfig(**common)


def bigg_config(cfg: Mapping[str, Any]) -> OpenCLIPTextConfig:
    """SDXL's `text_encoder_2` (the refiner's only one): OpenCLIP ViT-bigG/14's text tower as a transformers
    CLIPTextModelWithProjection, exact GELU, every block (the conditioner reads the penultimate and pools the last),
    its `projection_dim` the pooled vector's width; diffusers' converter dropped `logit_scale`."""
    common = _text_common(cfg)
    act = cfg.get("hidden_act", "quick_gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act is {act!r}; SDXL's text_encoder_2 is OpenCLIP ViT-bigG (exact gelu)")
    return OpenCLIPTextConfig(**common, embed_dim=_int(cfg, "projection_dim", 512), penultimate=True,
                              has_projection=True, has_logit_scale=False)


# ------------------------------------------------------------------------------ scheduler/scheduler_config.json
# The diffusers schedulers of the DDPM family: each builds its noise schedule (β, ᾱ) from the SCHEDULE keys below
# and runs its own sampler on it. gbsd builds the schedule (noise_schedule.NoiseSchedule) and runs its own samplers
# (--sampler), so which class a folder ships (PNDM for SD1.5, DDIM for SD2, Euler for SDXL) is not read; another
# class describes another kind of model (EDM's continuous σ, flow matching) and is refused.
DDPM_SCHEDULERS = frozenset({
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler",
    "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
})
# What the model was trained with: built (beta_schedule "linear" or "scaled_linear"), or refused by name.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr",
                 "prediction_type", "trained_betas")
# The shipped sampler's own run -- its timesteps (timestep_spacing, steps_offset), its σ spacing (Karras, ...), its
# solver, its last step (set_alpha_to_one, final_sigmas_type), its clipping range -- which gbsd's samplers choose for
# themselves (--sampler, --schedule; the spacing is SD's leading one, or trailing on a zero-terminal-SNR schedule,
# which must start at t = T-1 whatever the folder says). Not read.
SAMPLER_OPTIONS = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "interpolation_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "sigma_min", "sigma_max",
    "final_sigmas_type", "lambda_min_clipped", "lower_order_final", "euler_at_final", "solver_order", "solver_type",
    "algorithm_type", "predict_x0", "disable_corrector", "solver_p", "predictor_order", "corrector_order", "tau_func",
    "original_inference_steps", "timestep_scaling", "noise_sampler_seed", "clip_sample_range",
    "dynamic_thresholding_ratio", "sample_max_value", "variance_type",
    "flow_shift", "shift_terminal", "time_shift_type",  # used only with use_flow_sigmas / use_dynamic_shifting
})
# Options that would make x̂_0 or the model's parameterisation something no gbsd sampler computes: only their off
# value (diffusers' default for SD) is accepted.
SCHEDULER_FIXED: Mapping[str, Any] = MappingProxyType({
    "clip_sample": False,  # clipping x̂_0 to [-1, 1] (pixel-space DDPM); SD's latents leave that range
    "thresholding": False,  # Imagen's dynamic thresholding of x̂_0, also for pixel models
    "timestep_type": "discrete",  # "continuous": the UNet takes 0.25·log σ as its time (EDM-trained v-models)
    "use_flow_sigmas": False, "use_dynamic_shifting": False,  # flow matching: another kind of model
})
LEARNED_VARIANCE = ("learned", "learned_range")  # the model predicts its variance too (more output channels)


def scheduler_config(cfg: Mapping[str, Any]) -> NoiseSchedule:
    """diffusers scheduler_config.json -> the NoiseSchedule it declares (defaults: diffusers', a missing beta_schedule
    is "linear" 1e-4..0.02). Every key is a schedule key (built or refused by name), an option of the shipped
    sampler (not read), a fixed option, or private (`_class_name`, `_diffusers_version`); any other key is refused,
    since gbsd cannot tell whether it changes the schedule."""
    name = cfg.get("_class_name")
    if name is not None and name not in DDPM_SCHEDULERS:
        raise ValueError(f"_class_name {name!r} is not a scheduler of a DDPM noise schedule (beta_schedule, "
                         "num_train_timesteps), the kind of model gbsd samples")
    unknown = sorted(k for k in cfg if not k.startswith("_")
                     and k not in (*SCHEDULE_KEYS, *SAMPLER_OPTIONS, *SCHEDULER_FIXED))
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a scheduler option gbsd knows; it may change the noise schedule, "
                         "so the folder is refused")
    if cfg.get("trained_betas") is not None:
        raise ValueError("trained_betas (an explicit list of betas) is not built by gbsd; it builds beta_schedule "
                         "'linear' and 'scaled_linear'")
    _fixed(cfg, SCHEDULER_FIXED)
    if cfg.get("variance_type") in LEARNED_VARIANCE:
        raise ValueError(f"variance_type is {cfg['variance_type']!r}: a model that predicts its variance, not SD")
    zero_snr = _flag(cfg, "rescale_betas_zero_snr", False)
    if zero_snr and cfg.get("prediction_type", "epsilon") != "v_prediction":
        raise ValueError(f"rescale_betas_zero_snr is true with prediction_type {cfg.get('prediction_type', 'epsilon')!r}"
                         ": at zero SNR an epsilon model's x̂_0 divides by √ᾱ = 0; zero-SNR models predict v "
                         "(Lin et al. 2023)")
    return NoiseSchedule(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                         beta_start=cfg.get("beta_start", 0.0001), beta_end=cfg.get("beta_end", 0.02),
                         beta_schedule=cfg.get("beta_schedule", "linear"), zero_terminal_snr=zero_snr)
