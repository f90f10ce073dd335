"""The LoRA wing: LoRA / LoCon files (kohya, A1111, diffusers, PEFT) merged into a loaded bundle, in place, per GBSD
stage if asked. Off the learning route: the core never imports it (sampling.StageSwitch is the seam it plugs into).

    from gbsd_core.lora import apply_loras, load_lora
    with apply_loras(bundle, [(load_lora("weights/loras/style.safetensors"), 0.8)]):
        generate(bundle, params)

    files.py    reading and checking the files (formats, alpha, hashes)
    targets.py  the lookup: a file's module names -> the model's weights (both spellings, via diffusers_layout)
    merge.py    ΔW, the in-place merge with backups, AppliedLoras (the per-stage switch)
    tags.py     A1111's <lora:NAME:WEIGHT> prompt tags (as gbsd_core/prompts' parser hands them over), and NAME
                inside a folder
"""
from .files import LoraFile, LoraModule, load_lora
from .merge import AppliedLoras, LoraWeights, MergeReport, apply_loras, delta_weight
from .tags import LoraTag, find_lora, lora_tag, split_lora_tags
from .targets import LoraTargets, Target, lora_targets, lora_targets_of_configs

__all__ = ["AppliedLoras", "LoraFile", "LoraModule", "LoraTag", "LoraTargets", "LoraWeights", "MergeReport", "Target",
           "apply_loras", "delta_weight", "find_lora", "load_lora", "lora_tag", "lora_targets",
           "lora_targets_of_configs", "split_lora_tags"]
