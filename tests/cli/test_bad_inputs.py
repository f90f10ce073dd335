"""Every bad input of `gbsd generate`, `img2img`, `sweep` and `rack` (and of a PNG they read parameters from):
exit status 2, one line on stderr naming the problem, nothing written, and no weights loaded."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _broken import UNET, Workshop
from _cli import A1111, INFO, RAW, M, bomb_png, broken_zlib_png, meta_png, noise_png, run_cli
from PIL import Image


# ------------------------------------------------------------------------------------------------ no model needed


NAME_300 = "x" * 296 + ".png"

BAD_INPUTS = [
    # (id, argv after the command, text the message must contain). {ckpt}: the tiny checkpoint (for checks that need
    # the model's facts: its VAE factor, its family's largest size); otherwise a dummy file that must never be read.
    ("alpha-high", ["generate", "p", "--alpha", "1.5"], "alpha"),
    ("alpha-neg", ["generate", "p", "--focus", "f", "--alpha", "-0.1"], "alpha"),
    ("alpha-nan", ["generate", "p", "--alpha", "abc"], "--alpha"),
    ("layout-high", ["generate", "p", "--layout", "1.2"], "layout"),
    ("steps-zero", ["generate", "p", "--steps", "0"], "steps"),
    ("strength-zero", ["img2img", "p", "--init", "{img}", "--strength", "0"], "strength"),
    ("strength-high", ["img2img", "p", "--init", "{img}", "--strength", "1.5"], "strength"),
    ("strength-no-steps", ["img2img", "p", "--init", "{img}", "--strength", "0.1", "--steps", "5"], "--strength"),
    ("size-not-8", ["generate", "p", "--size", "60x64", "--weights", "{ckpt}"], "--size"),
    ("size-malformed", ["generate", "p", "--size", "big"], "--size"),
    ("init-missing-flag", ["img2img", "p"], "--init"),
    ("init-missing-file", ["img2img", "p", "--init", "{tmp}/nope.png"], "no such file"),
    ("init-not-image", ["img2img", "p", "--init", "{txt}"], "not a readable image"),
    ("init-float", ["img2img", "p", "--init", "{imgF}"], "floating-point image (mode F)"),
    ("init-32-bit-beyond-16", ["img2img", "p", "--init", "{imgI32}"], "beyond 16 bits"),
    ("sweep-init-float", ["sweep", "p", "--focus", "f", "--alphas", "0", "--init", "{imgF}"], "mode F"),
    ("init-size-not-8", ["img2img", "p", "--init", "{img60}", "--weights", "{ckpt}"], "multiple of 8"),
    ("weights-missing", ["generate", "p", "--weights", "{tmp}/missing.safetensors"], "weights file not found"),
    ("weights-default-absent", ["generate", "p", "{no-weights}"], "gbsd download sd15"),
    ("weights-name-absent", ["generate", "p", "--weights", "sd21"], "gbsd download sd21"),
    ("out-dir-missing", ["generate", "p", "-o", "{tmp}/no/such/dir/x.png"], "does not exist"),
    ("out-not-writable", ["generate", "p", "-o", "/proc/gbsd-test.png"], "not writable"),
    ("out-not-png", ["generate", "p", "-o", "{tmp}/x.jpg"], ".png"),
    ("out-is-dir", ["generate", "p", "-o", "{tmp}/sub.png"], "is a directory"),
    ("no-prompt", ["generate"], "prompt is required"),
    ("from-png-missing", ["generate", "--from-png", "{tmp}/nope.png"], "no such file"),
    ("from-png-no-meta", ["generate", "--from-png", "{img}"], "no generation parameters"),
    ("family-unknown", ["generate", "p", "--family", "sd9"], "family"),
    ("sweep-nothing", ["sweep", "p", "--focus", "f"], "--alphas and/or --focus-stack"),
    ("sweep-alphas-no-focus", ["sweep", "p", "--alphas", "0,1"], "focus prompt"),
    ("sweep-alpha-range", ["sweep", "p", "--focus", "f", "--alphas", "0,2"], "alpha"),
    ("sweep-alpha-text", ["sweep", "p", "--focus", "f", "--alphas", "0,x"], "--alphas"),
    ("sweep-names-repeat", ["sweep", "p", "--focus-stack", "a", "b", "-o", "{tmp}/same.png"], "repeat"),
    ("sweep-bad-pattern", ["sweep", "p", "--focus-stack", "a", "-o", "{tmp}/{nope}.png"], "pattern"),
    ("compile-mode-unknown", ["generate", "p", "--compile", "fastest"], "--compile"),
    # --- 1. types, whatever the source: a PNG's JSON chunk ...
    ("png-width-str", ["generate", "--from-png", M(width="64")], "width must be an integer"),
    ("png-height-float", ["generate", "--from-png", M(height=64.0)], "height must be an integer"),
    ("png-seed-float", ["generate", "--from-png", M(seed=1.5)], "seed must be an integer"),
    ("png-seed-float-whole", ["generate", "--from-png", M(seed=3.0)], "seed must be an integer"),
    ("png-seed-str", ["generate", "--from-png", M(seed="7")], "seed must be an integer"),
    ("png-steps-bool", ["generate", "--from-png", M(steps=True)], "steps must be an integer"),
    ("png-steps-null", ["generate", "--from-png", M(steps=None)], "steps must be an integer"),
    ("png-prompt-list", ["generate", "--from-png", M(prompt=["a", "b"])], "prompt must be text"),
    ("png-prompt-number", ["generate", "--from-png", M(prompt=5)], "prompt must be text"),
    ("png-negative-list", ["generate", "--from-png", M(negative=["ugly", "blurry"])], "negative must be text"),
    ("png-focus-dict", ["generate", "--from-png", M(focus={"a": 1})], "focus must be text"),
    ("png-alpha-str", ["generate", "--from-png", M(alpha="0.5")], "alpha must be a number"),
    ("png-alpha-bool", ["generate", "--from-png", M(alpha=False)], "alpha must be a number"),
    ("png-cfg-null", ["generate", "--from-png", M(cfg=None)], "cfg must be a number"),
    ("png-strength-list", ["generate", "--from-png", M(strength=[0.5])], "strength must be a number"),
    ("png-eta-dict", ["generate", "--from-png", M(eta={})], "eta must be a number"),
    ("png-layout-str", ["generate", "--from-png", M(layout="high")], "layout must be a number"),
    ("png-json-list", ["generate", "--from-png", RAW([1, 2])], "metadata"),
    ("png-json-deep", ["generate", "--from-png", RAW("[" * 100000 + "]" * 100000)], "metadata"),
    ("png-params-list", ["generate", "--from-png", RAW({"params": [1]})], "params"),
    ("png-model-str", ["generate", "--from-png", RAW({"params": {"prompt": "p"}, "model": "x"})], "model"),
    ("png-model-sha-int", ["generate", "--from-png", RAW({"params": {"prompt": "p"}, "model": {"sha256": 5}})],
     "sha256"),
    ("png-prompt-surrogate", ["generate", "--from-png", M(prompt="a \ud800 b")], "prompt"),
    ("png-prompt-nul", ["generate", "--from-png", M(prompt="a\u0000b")], "prompt"),
    ("png-prompt-huge", ["generate", "--from-png", M(prompt="x" * 20000)], "prompt"),
    # ... A1111 text ...
    ("info-cfg-nan", ["generate", "--from-png", INFO(A1111.replace("CFG scale: 7", "CFG scale: nan"))], "cfg"),
    ("info-cfg-inf", ["generate", "--from-png", INFO(A1111.replace("CFG scale: 7", "CFG scale: inf"))], "cfg"),
    ("info-seed-2-64", ["generate", "--from-png", INFO(A1111.replace("Seed: 1", f"Seed: {2**64}"))], "seed"),
    ("info-size-huge", ["generate", "--from-png", INFO(A1111.replace("64x64", "99992x99992"))], "width"),
    ("info-alpha-inf", ["generate", "--from-png", INFO(A1111 + ", GBSD focus: f, GBSD alpha: inf")], "alpha"),
    ("info-steps-text", ["generate", "--from-png", INFO(A1111.replace("Steps: 3", "Steps: many"))], "Steps"),
    ("info-executed-text", ["generate", "--from-png", INFO(A1111 + ", GBSD executed steps: x")], "executed"),
    # ... the command line
    ("prompt-surrogate", ["generate", "bad \udcff bytes"], "prompt"),
    ("negative-surrogate", ["generate", "p", "--negative", "\udce9t\udce9"], "negative"),
    ("prompt-nul", ["generate", "a\0b"], "prompt"),
    ("prompt-huge", ["generate", "x" * 20000], "prompt"),
    ("focus-empty", ["generate", "p", "--focus", ""], "focus"),
    ("focus-blank", ["generate", "p", "--focus", "   "], "focus"),
    ("focus-stack-empty", ["sweep", "p", "--focus-stack", "a", ""], "focus"),
    # --- 2. non-finite and absurd numbers
    ("cfg-nan", ["generate", "p", "--cfg", "nan"], "cfg"),
    ("cfg-inf", ["generate", "p", "--cfg", "inf"], "cfg"),
    ("cfg-neg-inf", ["generate", "p", "--cfg", "-inf"], "cfg"),
    ("cfg-huge", ["generate", "p", "--cfg", "1e9"], "cfg"),
    ("cfg-negative", ["generate", "p", "--cfg", "-5"], "cfg"),
    ("alpha-float-nan", ["generate", "p", "--focus", "f", "--alpha", "nan"], "alpha"),
    ("alpha-inf", ["generate", "p", "--focus", "f", "--alpha", "inf"], "alpha"),
    ("layout-nan", ["generate", "p", "--focus", "f", "--layout", "nan"], "layout"),
    ("layout-neg-inf", ["generate", "p", "--layout", "-inf"], "layout"),
    ("strength-nan", ["img2img", "p", "--init", "{img}", "--strength", "nan"], "strength"),
    ("eta-nan", ["generate", "p", "--eta", "nan"], "eta"),
    ("eta-100", ["generate", "p", "--eta", "100"], "eta"),
    ("eta-1.5", ["generate", "p", "--eta", "1.5"], "eta"),
    ("eta-negative", ["generate", "p", "--eta", "-0.5"], "eta"),
    ("steps-1000", ["generate", "p", "--steps", "1000", "--weights", "{ckpt}"], "steps"),  # the model's schedule
    ("steps-huge", ["generate", "p", "--steps", "100000"], "steps"),
    ("steps-negative", ["generate", "p", "--steps", "-3"], "steps"),
    ("seed-negative", ["generate", "p", "--seed", "-1"], "seed"),
    ("seed-2-64", ["generate", "p", "--seed", str(2**64)], "seed"),
    ("seed-huge", ["generate", "p", "--seed", "9" * 40], "seed"),
    ("size-huge", ["generate", "p", "--size", "99992x99992"], "--size"),
    ("size-zero-w", ["generate", "p", "--size", "0x64"], "--size"),
    ("size-zero-h", ["generate", "p", "--size", "64x0"], "--size"),
    ("size-absurd-digits", ["generate", "p", "--size", "64x" + "9" * 30], "--size"),
    ("size-above-family", ["generate", "p", "--size", "2560x512", "--weights", "{ckpt}"], "2048"),
    ("sweep-alphas-nan", ["sweep", "p", "--focus", "f", "--alphas", "0,nan"], "--alphas"),
    ("sweep-alphas-inf", ["sweep", "p", "--focus", "f", "--alphas", "inf"], "--alphas"),
    ("sweep-alphas-overflow", ["sweep", "p", "--focus", "f", "--alphas", "1e400"], "--alphas"),
    ("sweep-alphas-empty", ["sweep", "p", "--focus", "f", "--alphas", ","], "--alphas"),
    ("init-larger-than-family", ["img2img", "p", "--init", "{img2064}", "--weights", "{ckpt}"], "2048"),
    # --- 3. image files, decoded before they are accepted
    ("init-bomb", ["img2img", "p", "--init", "{bomb}"], "pixels"),
    ("init-big", ["img2img", "p", "--init", "{big}"], "pixels"),
    ("init-broken-zlib", ["img2img", "p", "--init", "{zlib}"], "not a readable image"),
    ("init-truncated", ["img2img", "p", "--init", "{cut}"], "not a readable image"),
    ("init-fifo", ["img2img", "p", "--init", "{fifo}"], "not a regular file"),
    ("init-dir", ["img2img", "p", "--init", "{tmp}/sub.png"], "not a regular file"),
    ("sweep-init-broken-zlib", ["sweep", "p", "--focus", "f", "--alphas", "0", "--init", "{zlib}"],
     "not a readable image"),
    ("from-png-bomb", ["generate", "--from-png", "{bomb-meta}"], "pixels"),
    ("from-png-broken-zlib", ["generate", "--from-png", "{zlib-meta}"], "not a readable image"),
    ("from-png-fifo", ["generate", "--from-png", "{fifo}"], "not a regular file"),
    # --- 6. output names and patterns
    ("out-name-too-long", ["generate", "p", "-o", "{tmp}/" + NAME_300], "too long"),
    ("out-nul", ["generate", "p", "-o", "{tmp}/a\0b.png"], "-o"),
    ("out-parent-is-file", ["generate", "p", "-o", "{txt}/x.png"], "-o"),
    ("out-is-init", ["img2img", "p", "--init", "{img}", "-o", "{img}"], "overwrite"),
    ("out-is-init-relative", ["img2img", "p", "--init", "{img}", "-o", "in.png"], "overwrite"),
    ("out-is-from-png", ["generate", "--from-png", "{good-meta}", "-o", "{good-meta}"], "overwrite"),
    ("sweep-out-is-init", ["sweep", "p", "--focus", "f", "--alphas", "0", "--init", "{img}", "-o", "{img}"],
     "overwrite"),
    ("sweep-pattern-attr", ["sweep", "p", "--focus", "f", "--alphas", "0,1", "-o", "{tmp}/{index.nope}.png"], "pattern"),
    ("sweep-pattern-item", ["sweep", "p", "--focus", "f", "--alphas", "0,1", "-o", "{tmp}/{alpha[0]}.png"], "pattern"),
    ("sweep-pattern-positional", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{0}.png"], "pattern"),
    ("sweep-pattern-empty", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{}.png"], "pattern"),
    ("sweep-pattern-conversion", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{index!z}.png"],
     "pattern"),
    ("sweep-pattern-spec", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{alpha:q}.png"], "pattern"),
    ("sweep-pattern-open", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{index.png"], "pattern"),
    ("sweep-pattern-wide", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{index:099999999}.png"],
     "pattern"),
    ("sweep-pattern-nested", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{alpha:{seed}}.png"],
     "pattern"),
    ("sweep-pattern-too-long", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{index}" + NAME_300],
     "too long"),
    # a field's text may not make folders (a separator, "." or ".."), nor hold a NUL; {seed:c} past Unicode's end
    ("sweep-pattern-char-overflow", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", "1114112",
                                     "-o", "{tmp}/{seed:c}.png"], "{seed:c} of seed 1114112"),
    ("sweep-pattern-char-huge", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", str(2**64 - 1),
                                 "-o", "{tmp}/{seed:c}.png"], "{seed:c} of seed"),
    ("sweep-pattern-char-slash", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", "47",
                                  "-o", "{tmp}/x{seed:c}y.png"], "path separator"),
    ("sweep-pattern-index-char", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{index:c}.png"],
     "{index:c} of index 0 is '\\x00': a NUL"),
    ("sweep-pattern-fill-slash", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{alpha:/>8}.png"],
     "path separator"),
    ("sweep-pattern-fill-slash-left", ["sweep", "p", "--focus", "f", "--alphas", "0", "-o", "{tmp}/{seed:/<9}.png"],
     "path separator"),
    ("sweep-pattern-char-nul", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", "0",
                                "-o", "{tmp}/a{seed:c}.png"], "NUL"),
    ("sweep-pattern-dotdot", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", "46",
                              "-o", "{tmp}/sub.png/{seed:c}{seed:c}/x.png"], "folder '..'"),
    ("sweep-pattern-dot", ["sweep", "p", "--focus", "f", "--alphas", "0", "--seed", "46",
                           "-o", "{tmp}/{seed:c}/x.png"], "folder '.'"),
    # --- 7. paths from metadata: only a plain file name, looked up inside the weights folder
    ("png-model-dotdot", ["generate", "--from-png", RAW({"params": {"prompt": "p"}, "model": {"file": ".."}}),
                          "{no-weights}"], "model"),
    ("png-model-path", ["generate", "--from-png",
                        RAW({"params": {"prompt": "p"}, "model": {"file": "../tiny-sd1.safetensors"}}), "{no-weights}"],
     "model"),
    ("png-model-absolute", ["generate", "--from-png",
                            RAW({"params": {"prompt": "p"}, "model": {"file": "/etc/passwd"}}), "{no-weights}"], "model"),
    ("png-model-int", ["generate", "--from-png", RAW({"params": {"prompt": "p"}, "model": {"file": 42}}),
                       "{no-weights}"], "model"),
    ("png-model-list", ["generate", "--from-png", RAW({"params": {"prompt": "p"}, "model": {"file": ["a"]}}),
                        "{no-weights}"], "model"),
    ("info-model-dotdot", ["generate", "--from-png", INFO(A1111 + ", Model: .."), "{no-weights}"], "model"),
    ("info-model-path", ["generate", "--from-png", INFO(A1111 + ", Model: ../../etc/x"), "{no-weights}"], "model"),
    # --- 4. weights files: what they are, before they are opened; parts that do not fit, before they load
    ("weights-fifo", ["generate", "p", "--weights", "{fifo-weights}"], "named pipe"),
    ("weights-nul", ["generate", "p", "--weights", "a\0b.safetensors"], "weights"),
    ("weights-9-channel-unet", ["generate", "p", "--weights", "{unet9}"], "9-channel"),
    # --- 9. small ones
    ("device-meta", ["generate", "p", "--device", "meta"], "--device"),
    ("device-mps", ["generate", "p", "--device", "mps"], "--device"),
    ("device-empty", ["generate", "p", "--device", ""], "--device"),
    ("device-unknown", ["generate", "p", "--device", "quantum"], "--device"),
    ("device-cuda-index", ["generate", "p", "--device", "cuda:99"], "--device"),
    # the rack-frame fields
    ("focus-to-no-focus", ["generate", "p", "--focus-to", "b"], "focus_to needs a focus"),
    ("focus-mix-no-to", ["generate", "p", "--focus", "f", "--focus-mix", "0.5"], "needs focus_to"),
    ("focus-mix-range", ["generate", "p", "--focus", "f", "--focus-to", "g", "--focus-mix", "1.5"], "focus_mix"),
    # --trace (the x̂0 filmstrip)
    ("trace-not-writable", ["generate", "p", "--trace", "/proc/gbsd-trace"], "not writable"),
    ("trace-existing-not-writable", ["generate", "p", "--trace", "/proc"], "not writable"),
    ("trace-is-a-file", ["generate", "p", "--trace", "{txt}"], "is a file"),
    ("trace-parent-missing", ["generate", "p", "--trace", "{tmp}/no/such/trace"], "does not exist"),
    ("trace-every-zero", ["generate", "p", "--trace", "{tmp}/tr", "--trace-every", "0"], "--trace-every"),
    ("trace-every-text", ["generate", "p", "--trace", "{tmp}/tr", "--trace-every", "two"], "--trace-every"),
    ("trace-every-alone", ["generate", "p", "--trace-every", "2"], "needs --trace"),
    ("trace-preview-alone", ["generate", "p", "--trace-preview", "linear"], "needs --trace"),
    ("trace-preview-unknown", ["generate", "p", "--trace", "{tmp}/tr", "--trace-preview", "taesd"], "--trace-preview"),
    ("trace-img2img-bad-init", ["img2img", "p", "--init", "{txt}", "--trace", "{tmp}/tr"], "not a readable image"),
    ("trace-not-for-sweep", ["sweep", "p", "--focus", "f", "--alphas", "0", "--trace", "{tmp}/tr"], "--trace"),
    # gbsd rack
    ("rack-frames-one", ["rack", "p", "--from", "a", "--to", "b", "--frames", "1"], "--frames"),
    ("rack-frames-many", ["rack", "p", "--from", "a", "--to", "b", "--frames", "65"], "--frames"),
    ("rack-same-prompt", ["rack", "p", "--from", "a bunny", "--to", "A  Bunny"], "same prompt"),
    ("rack-no-to", ["rack", "p", "--from", "a bunny"], "--to"),
    ("rack-no-from", ["rack", "p", "--to", "a carrot"], "--from"),
    ("rack-empty-from", ["rack", "p", "--from", " ", "--to", "a carrot"], "--from is empty"),
    ("rack-no-prompt", ["rack", "--from", "a", "--to", "b"], "prompt is required"),
    ("rack-layout-one", ["rack", "p", "--from", "a", "--to", "b", "--layout", "1"], "no focus stage"),
    ("rack-alpha-one", ["rack", "p", "--from", "a", "--to", "b", "--alpha", "1"], "alpha 1"),
    ("rack-alpha-range", ["rack", "p", "--from", "a", "--to", "b", "--alpha", "2"], "alpha"),
    ("rack-steps-zero", ["rack", "p", "--from", "a", "--to", "b", "--steps", "0"], "steps"),
    ("rack-out-not-animation", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/r.png"], ".webp or .gif"),
    ("rack-out-dir-missing", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/no/r.webp"], "does not exist"),
    ("rack-out-not-writable", ["rack", "p", "--from", "a", "--to", "b", "-o", "/proc/r.webp"], "not writable"),
    ("rack-out-is-dir", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/sub.webp"], "is a directory"),
    ("rack-from-png-no-meta", ["rack", "--from-png", "{img}", "--to", "b"], "no generation parameters"),
    ("focus-to-blank", ["generate", "p", "--focus", "f", "--focus-to", " "], "focus_to must not be blank"),
    ("focus-mix-nan", ["generate", "p", "--focus", "f", "--focus-to", "g", "--focus-mix", "nan"], "focus_mix"),
    ("png-focus-to-list", ["generate", "--from-png", M(focus="f", focus_to=["g"])], "focus_to must be text"),
    ("rack-frames-from-png-str", ["rack", "--from-png", RAW({"params": {"prompt": "p", "focus": "a",
                                                                      "focus_to": "b"}, "rack": {"frames": "12"}})],
     "--frames"),
    ("rack-from-png-bomb", ["rack", "--from-png", "{bomb-meta}", "--to", "b"], "pixels"),
    ("rack-cfg-nan", ["rack", "p", "--from", "a", "--to", "b", "--cfg", "nan"], "cfg"),
    ("rack-out-too-long", ["rack", "p", "--from", "a", "--to", "b", "-o", "{tmp}/" + "r" * 290 + ".webp"], "too long"),
    ("rack-size-not-8", ["rack", "p", "--from", "a", "--to", "b", "--size", "60x64", "--weights", "{ckpt}"],
     "multiple of 8"),
    ("rack-device-meta", ["rack", "p", "--from", "a", "--to", "b", "--device", "meta"], "--device"),
    ("trace-dir-name-too-long", ["generate", "p", "--trace", "{tmp}/" + "t" * 300], "too long"),
    # --- SDXL ({sdxl}: the tiny SDXL base file): its size rules and its family
    ("sdxl-size-odd", ["generate", "p", "--size", "1020x1023", "--weights", "{sdxl}"], "multiple of 8"),
    ("sdxl-init-size-odd", ["img2img", "p", "--init", "{img60}", "--weights", "{sdxl}"], "multiple of 8"),
    ("sdxl-size-beyond-4x", ["sweep", "p", "--focus", "f", "--alphas", "0", "--size", "4104x1024",
                             "--weights", "{sdxl}"], "width"),
    ("sdxl-as-sd1", ["generate", "p", "--weights", "{sdxl}", "--family", "sd1"], "expects a clip text encoder"),
    ("sdxl-base-as-refiner", ["rack", "p", "--from", "a", "--to", "b", "--weights", "{sdxl}", "--family",
                              "sdxl-refiner"], "sdxl-openclip"),
    # --sampler / --schedule, by the core's rules (params.FIELDS, check_together, the sampler's own schedule)
    ("sampler-unknown", ["generate", "p", "--sampler", "heun"], "sampler must be one of ddim, euler, euler_a, dpmpp_2m"),
    ("sampler-a1111-name", ["generate", "p", "--sampler", "Euler a"], "sampler must be one of"),
    ("sampler-empty", ["generate", "p", "--sampler", ""], "sampler must be one of"),
    ("schedule-unknown", ["generate", "p", "--sampler", "euler", "--schedule", "exponential"],
     "schedule must be one of normal, karras"),
    ("schedule-karras-with-ddim", ["generate", "p", "--schedule", "karras"], "for the σ samplers"),
    ("eta-with-a-sigma-sampler", ["generate", "p", "--sampler", "euler_a", "--eta", "0.5"], "eta is DDIM's"),
    ("sampler-dpmpp-999-steps", ["generate", "p", "--sampler", "dpmpp_2m", "--steps", "999", "--weights", "{ckpt}"],
     "t=1000"),
    ("sampler-img2img-no-steps", ["img2img", "p", "--init", "{img}", "--sampler", "euler", "--strength", "0.1",
                                  "--steps", "5"], "--strength"),
    ("sweep-sampler-unknown", ["sweep", "p", "--focus", "f", "--alphas", "0", "--sampler", "lms"], "sampler"),
    ("rack-sampler-unknown", ["rack", "p", "--from", "a", "--to", "b", "--sampler", "heun"], "sampler"),
    ("rack-schedule-with-ddim", ["rack", "p", "--from", "a", "--to", "b", "--schedule", "karras"], "σ samplers"),
    ("png-sampler-number", ["generate", "--from-png", M(sampler=2)], "sampler must be one of"),
    ("png-schedule-ddim-karras", ["generate", "--from-png", M(schedule="karras")], "for the σ samplers"),
    ("info-sampler-heun", ["generate", "--from-png", INFO(A1111.replace("Sampler: DDIM", "Sampler: Heun"))],
     "got 'Heun'"),
    ("info-schedule-exponential", ["generate", "--from-png", INFO(A1111.replace(
        "Sampler: DDIM", "Sampler: Euler, Schedule type: Exponential"))], "got 'Exponential'"),
]


def _crafted(work: Path, ckpt: Path, dummy: Path, sdxl: Path) -> dict[str, str]:
    """The files the BAD_INPUTS cases name, by their {placeholder}."""
    img = noise_png(work / "in.png")
    txt = work / "notes.png"
    txt.write_text("this is not an image")
    cut = work / "cut.png"
    cut.write_bytes(img.read_bytes()[:300])
    os.mkfifo(work / "pipe.png")
    os.mkfifo(work / "pipe.safetensors")
    good = meta_png(work / "good.png", {"version": 1, "params": {"prompt": "p"}})
    Image.new("F", (64, 64), 0.5).save(work / "f.tif")  # float and 32-bit TIFFs: no white level gbsd can know
    Image.fromarray(np.full((64, 64), 70000, dtype=np.int32)).save(work / "i32.tif")
    meta = json.dumps({"version": 1, "params": {"prompt": "p"}})
    return {"{tmp}": str(work), "{sdxl}": str(sdxl), "{img60}": str(noise_png(work / "in60.png", size=(60, 64))), "{img}": str(img),
            "{txt}": str(txt), "{ckpt}": str(ckpt), "{bomb-meta}": str(bomb_png(work / "bombm.png", texts={"gbsd": meta})),
            "{zlib-meta}": str(broken_zlib_png(work / "zlibm.png", texts={"gbsd": meta})),
            "{bomb}": str(bomb_png(work / "bomb.png")), "{big}": str(bomb_png(work / "big.png", side=12000)),
            "{zlib}": str(broken_zlib_png(work / "zlib.png")), "{cut}": str(cut), "{fifo}": str(work / "pipe.png"),
            "{good-meta}": str(good), "{img2064}": str(noise_png(work / "wide.png", size=(2064, 8))),
            "{fifo-weights}": str(work / "pipe.safetensors"), "{imgF}": str(work / "f.tif"),
            "{imgI32}": str(work / "i32.tif"),
            "{unet9}": str(Workshop(work, work).single("unet9.safetensors", unet=replace(UNET, in_channels=9)))}


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every entry under `d` (folders and pipes too), with the bytes of the regular files."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in d.rglob("*")}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_before_loading(case, tmp_path, capsys, monkeypatch, no_load, dummy_weights, tiny_ckpt,
                                          tiny_sdxl_ckpt):
    name, argv, needle = case
    work = tmp_path / "work"
    work.mkdir()
    (work / "sub.png").mkdir()
    (work / "sub.webp").mkdir()
    subs = _crafted(work, tiny_ckpt, dummy_weights, tiny_sdxl_ckpt)

    def sub(a: str) -> str:
        if a.startswith("{meta:"):
            return str(meta_png(work / "meta.png", gbsd=a[len("{meta:"):-1]))
        if a.startswith("{info:"):
            return str(meta_png(work / "info.png", parameters=a[len("{info:"):-1]))
        for k, v in subs.items():
            a = a.replace(k, v)
        return a

    weights = "{no-weights}" not in argv
    argv = [sub(a) for a in argv if a != "{no-weights}"]
    if "--weights" not in argv and weights:
        argv += ["--weights", str(dummy_weights)]
    if "-o" not in argv:
        argv += ["-o", str(work if argv[0] == "sweep" else work / ("rack.webp" if argv[0] == "rack" else "out.png"))]
    weights_dir = tmp_path / "weights"  # what a PNG's model field may name: only files in here
    weights_dir.mkdir()
    monkeypatch.setenv("GBSD_WEIGHTS", str(weights_dir))
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    code, out, err = run_cli(argv, capsys)
    print(f"{name}: {err.strip()}")
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1  # one line
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing written or overwritten: no output, animation, trace folder, .tmp
