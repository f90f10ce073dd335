"""PNG metadata: what made this image, in two forms, and reading it back for `gbsd generate --from-png`.

Two text chunks are written:

* `parameters` -- the A1111 "infotext" convention that image viewers, Civitai and A1111's "PNG Info" tab read::

      <prompt>
      Negative prompt: <negative>                        (line omitted when the negative prompt is empty)
      Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-...,
      Denoising strength: 0.75, GBSD focus: "a carrot, small", GBSD alpha: 0.5, GBSD layout: 0.8, ...

  The last line is `key: value` pairs joined by ", "; a value containing ',', ':' or a newline is written as a
  JSON string (A1111's `quote()` rule), so it survives the split. "Model hash" is the first 10 hex digits of the
  file's sha256 (A1111's current hash). GBSD's own keys are prefixed "GBSD " so they cannot clash with A1111's.

  Samplers by A1111's names (`SAMPLER_NAMES`): "DDIM", "Euler", "Euler a", "DPM++ 2M", "LCM". Since v1.9 A1111 writes the
  noise schedule apart, as `Schedule type:` (processing.create_infotext writes `p.scheduler`, "Automatic" unless one
  is chosen; the k-diffusion sampler then overrides it with the label of the schedule it resolved, so DPM++ 2M on
  "Automatic" is written "Schedule type: Karras", its default there). Written here for the σ samplers only, and never
  "Automatic" (it means the sampler's own default, Karras for DPM++ 2M): "Karras", or "Uniform" (A1111's name for
  the model's evenly spaced σ) for the normal schedule. DDIM lines carry none, as before; read back, a DDIM line's
  schedule is ignored (A1111 >= 1.9 writes one for every sampler, and DDIM does not use it). Read back: those
  labels, "Normal", "Automatic" (the sampler's default in A1111 >= 1.9, the only versions that write the key), or none (the
  model's own schedule: A1111 < 1.9 put Karras into the sampler's name, "DPM++ 2M Karras", which is read too). A name
  gbsd does not implement ("Heun", "Exponential") is kept as it is, so the parameter check refuses it by name unless
  `--sampler` / `--schedule` override it. The same method and schedule is not the same image: A1111 spaces the σ
  samplers' steps as k-diffusion does, gbsd as diffusers' "leading" (sigmas.py). Few-step runs: the trailing spacing
  of the normal schedule is written and read as A1111's "SGM Uniform" (what it pairs with SD-Turbo / SDXL-Turbo); LCM
  is "Sampler: LCM" with no schedule written, and a schedule read with it is ignored, as DDIM's (lcm.py runs its own).
  The `gbsd` JSON keeps every spacing exactly.

  Prompts are written as given, their syntax intact (A1111's emphasis, BREAK, prompt editing, embedding names).
  How they were read is written as A1111 does: `Emphasis: No norm` (or Ignore, None) when not A1111's default
  "Original", `Pad conds: True` when prompts of different chunk counts were padded with the empty prompt's chunk
  (gbsd's `chunk_padding` "empty"; without it A1111 runs them as separate calls, gbsd's default "repeat"), and
  `TI hashes: "name: 0123456789, ..."` for the textual-inversion embeddings named (the first 10 hex digits of each
  file's sha256, A1111's short hash). Read back the same way ("Pad conds v0", A1111's older last-vector padding, is
  not implemented and is refused by name).

* `gbsd` -- machine-readable JSON with every `GenerationParams` field exactly (floats via JSON's shortest
  round-trip repr), the model file name and its full sha256. `read_params` prefers it; the infotext parser is the
  fallback for images whose JSON chunk was stripped, or that came from elsewhere.

PIL writes a chunk as iTXt (UTF-8) instead of tEXt (Latin-1) when the text needs it, so any prompt round-trips.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

if TYPE_CHECKING:  # pipeline imports torch; keep this module importable without it
    from ..pipeline import GenerationParams

JSON_KEY = "gbsd"
INFOTEXT_KEY = "parameters"
FORMAT_VERSION = 1
# samplers.SAMPLERS by A1111's names (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py) and back
SAMPLER_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "lcm": "LCM"}
SCHEDULE_LABELS = {"normal": "Uniform", "karras": "Karras"}  # A1111's modules/sd_schedulers.py labels
# A1111's "SGM Uniform" (sd_schedulers.sgm_uniform: n timesteps evenly from T−1 down, as sgm's turbo samplers) is the
# trailing spacing of the normal schedule; A1111 places them at fractional timesteps, diffusers (and gbsd) rounds them
SGM_UNIFORM = "SGM Uniform"
# What A1111's other labels for our two schedules mean when read (its "Normal" is evenly spaced in t as well)
_SCHEDULES_READ = {"uniform": "normal", "normal": "normal", "karras": "karras"}
_AUTOMATIC = {"dpmpp_2m": "karras"}  # A1111 >= 1.9: a sampler's default schedule where it is not the model's own
# GenerationParams.emphasis by A1111's names (modules/sd_emphasis.py)
EMPHASIS_NAMES = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None"}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Everything the metadata says about one image, besides the parameters themselves."""

    width: int
    height: int
    model_file: str | None = None  # file (or diffusers folder) name, no directory
    model_sha256: str | None = None
    img2img: bool = False
    executed_steps: int | None = None
    layout_steps: int | None = None
    # The run's LoRAs (cli/loras.py RunLoras.records): name, file, sha256, a1111_hash, scale, stage, from
    loras: tuple[dict[str, Any], ...] = ()
    embeddings: dict[str, str] | None = None  # the textual inversions the prompts name: name -> file sha256


# --------------------------------------------------------------------------------------------------- writing


def _num(x: float) -> str:
    # repr() is the shortest string that parses back to the same float: 0.1 -> "0.1", 7.5 -> "7.5".
    return repr(float(x))


def _quote(value: Any) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def model_label(model_file: str) -> str:
    """A1111's "Model" value: the checkpoint file name without its extension (a folder name stays as is)."""
    p = Path(model_file)
    return p.stem if p.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else p.name


def sampler_label(sampler: str, schedule: str) -> str:
    """A sampler and schedule as one A1111-style name: "DDIM", "Euler a", "DPM++ 2M Karras" (tables, captions)."""
    return SAMPLER_NAMES[sampler] + (" Karras" if schedule == "karras" else "")


def _read_sampler(pairs: dict[str, str]) -> dict[str, str]:
    """The `sampler` / `schedule` fields an infotext's `Sampler:` and `Schedule type:` stand for (see the module
    docstring); {} without a Sampler key (the defaults apply)."""
    if "Sampler" not in pairs:
        return {}
    by_name = {v.lower(): k for k, v in SAMPLER_NAMES.items()}
    # No Schedule type: an image of A1111 < 1.9 (which named Karras in the sampler) or of gbsd's DDIM: the model's own
    # schedule. A1111 >= 1.9 always writes one.
    name, label = pairs["Sampler"].strip(), pairs.get("Schedule type", "Uniform").strip()
    sampler = by_name.get(name.lower())
    if sampler is None and name.lower().endswith(" karras") and name[:-len(" karras")].lower() in by_name:
        sampler, label = by_name[name[:-len(" karras")].lower()], "Karras"  # A1111 < 1.9: "DPM++ 2M Karras"
    if sampler is None:
        return {"sampler": name}  # not one of ours: the parameter check names it
    if sampler in ("ddim", "lcm"):
        # A1111 >= 1.9 writes its Schedule type for every sampler (processing.create_infotext: p.scheduler), but
        # DDIM spaces its own timesteps (sd_samplers_timesteps) and ignores it: "DDIM, Schedule type: Karras" is DDIM.
        # LCM runs its own skipped schedule here (lcm.py), whatever A1111 paired it with ("SGM Uniform", usually).
        return {"sampler": sampler, "schedule": "normal"}
    if label.lower() == SGM_UNIFORM.lower():
        return {"sampler": sampler, "schedule": "normal", "spacing": "trailing"}
    if label.lower() == "automatic":
        return {"sampler": sampler, "schedule": _AUTOMATIC.get(sampler, "normal")}
    return {"sampler": sampler, "schedule": _SCHEDULES_READ.get(label.lower(), label)}


def _flag_tags(record: ImageRecord, stage: str) -> str:
    """The LoRAs given by flag for `stage`, as A1111 tags (those given as tags are in the prompts already)."""
    return " ".join(f"<lora:{e['name']}:{_num(e['scale'])}>" for e in record.loras
                    if e["from"] == "flag" and e["stage"] == stage)


def _with(text: str, tags: str) -> str:
    return f"{text} {tags}" if tags else text


def lora_hashes(record: ImageRecord) -> str:
    """A1111's `Lora hashes` value, "name: hash, ...", ':' and ',' taken out of the names (extra_networks_lora.py)."""
    seen: dict[str, str] = {}
    for e in record.loras:
        seen.setdefault(re.sub(r"[:,]", "", e["name"]), e["a1111_hash"])
    return ", ".join(f"{name}: {h}" for name, h in seen.items())


def infotext(params: GenerationParams, record: ImageRecord) -> str:
    """The A1111-style `parameters` text for one image (see module docstring). LoRAs as A1111 records them: tags in
    the prompt (those given by flag added: both stages to the prompt, the focus stage's to `GBSD focus`, the layout
    stage's under `GBSD layout loras`) and `Lora hashes`."""
    fields: list[tuple[str, Any]] = [("Steps", params.steps), ("Sampler", SAMPLER_NAMES[params.sampler])]
    if params.sampler not in ("ddim", "lcm"):
        trailing = params.spacing == "trailing" and params.schedule == "normal"
        fields.append(("Schedule type", SGM_UNIFORM if trailing else SCHEDULE_LABELS[params.schedule]))
    fields += [
        ("CFG scale", _num(params.cfg)),
        ("Seed", params.seed),
        ("Size", f"{record.width}x{record.height}"),
    ]
    if record.model_sha256:
        fields.append(("Model hash", record.model_sha256[:10]))
    if record.model_file:
        fields.append(("Model", model_label(record.model_file)))
    if record.img2img:
        fields.append(("Denoising strength", _num(params.strength)))
    if params.eta != 0.0:
        fields.append(("Eta DDIM", _num(params.eta)))  # A1111 writes this key only when eta is not its default 0
    if params.focus is not None:
        fields += [("GBSD focus", _with(params.focus, _flag_tags(record, "focus"))), ("GBSD alpha", _num(params.alpha)),
                   ("GBSD layout", _num(params.layout))]
        if params.focus_to is not None:  # a rack-focus frame: the local embedding part way to a second prompt
            fields += [("GBSD focus to", params.focus_to), ("GBSD focus mix", _num(params.focus_mix))]
        if record.layout_steps is not None:
            fields.append(("GBSD layout steps", record.layout_steps))
    if record.executed_steps is not None:
        fields.append(("GBSD executed steps", record.executed_steps))
    if _flag_tags(record, "layout"):
        fields.append(("GBSD layout loras", _flag_tags(record, "layout")))
    if params.emphasis != "original":
        fields.append(("Emphasis", EMPHASIS_NAMES[params.emphasis]))
    if params.chunk_padding == "empty":
        fields.append(("Pad conds", "True"))
    if record.embeddings:
        fields.append(("TI hashes", ", ".join(f"{n.replace(':', '').replace(',', '')}: {h[:10]}"
                                              for n, h in record.embeddings.items())))
    if record.loras:
        fields.append(("Lora hashes", lora_hashes(record)))
    text = _with(params.prompt, _flag_tags(record, "both"))
    if params.negative:
        text += f"\nNegative prompt: {params.negative}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in fields)


def json_text(params: GenerationParams, record: ImageRecord, extra: dict[str, Any] | None = None) -> str:
    """The machine-readable `gbsd` chunk: all GenerationParams fields plus the record, plus `extra`'s entries (e.g.
    "trace" or "rack": what else the picture shows; readers ignore keys they do not know)."""
    payload = {
        "version": FORMAT_VERSION,
        "params": dataclasses.asdict(params),
        "mode": "img2img" if record.img2img else "txt2img",
        "size": [record.width, record.height],
        "model": {"file": record.model_file, "sha256": record.model_sha256},
        "executed_steps": record.executed_steps,
        "layout_steps": record.layout_steps,
        "embeddings": record.embeddings or {},
    }
    if record.loras:
        payload["loras"] = list(record.loras)
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise ValueError(f"extra metadata may not replace the standard entries {clash}")
    payload.update(extra or {})
    return json.dumps(payload, ensure_ascii=True, sort_keys=True)


def pnginfo(params: GenerationParams, record: ImageRecord, extra: dict[str, Any] | None = None) -> PngInfo:
    info = PngInfo()
    info.add_text(INFOTEXT_KEY, infotext(params, record))
    info.add_text(JSON_KEY, json_text(params, record, extra))
    return info


def save_png_atomic(image: Image.Image, path: str | os.PathLike, info: PngInfo | None = None) -> None:
    """Write a PNG so that `path` is either the old file or the complete new one, never a partial write."""
    from ..loading import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


# --------------------------------------------------------------------------------------------------- reading

# One `key: value` pair of the infotext's last line: value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][A-Za-z0-9 _/\-]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse A1111 infotext into (GenerationParams field values, other facts: size, model, ...).

    Keys this program does not know (other samplers' options, ...) are ignored; `Sampler:` and `Schedule type:` as
    the module docstring says. As A1111's parse_generation_parameters (modules/infotext_utils.py): the text is split
    at "\n" and each line stripped, so CRLF text loses its "\r"s. An image of A1111's hires fix (txt2img, its keys
    "Hires upscale" / "Hires resize" / ..., or the old "First pass size") is its first pass at `Size`, a txt2img:
    its "Denoising strength" is the hires pass's (0 is an upscale alone), not an img2img strength; the hires keys are
    returned in extra["hires"].
    """
    lines = [line.strip() for line in text.strip().split("\n")]
    last = lines[-1] if lines else ""
    pairs: dict[str, str] = {}
    if len(_PAIR.findall(last)) >= 3:  # A1111's heuristic: a real parameter line has several pairs
        lines = lines[:-1]
        for key, raw in _PAIR.findall(last):
            raw = raw.strip()
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                try:
                    raw = json.loads(raw)
                except ValueError:
                    pass
            pairs[key.strip()] = raw
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None and line.startswith("Negative prompt:"):
            negative_lines = [line[len("Negative prompt:"):].strip()]
        elif negative_lines is not None:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)

    params: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative": "\n".join(negative_lines or [])}
    extra: dict[str, Any] = {}
    hires = {k: v for k, v in pairs.items() if k.startswith("Hires ") or k == "First pass size"}
    img2img = "Denoising strength" in pairs and not hires
    conv = {"Steps": ("steps", int), "CFG scale": ("cfg", float), "Seed": ("seed", int),
            **({"Denoising strength": ("strength", float)} if img2img else {}), "Eta DDIM": ("eta", float),
            "GBSD focus": ("focus", str),
            "GBSD alpha": ("alpha", float), "GBSD layout": ("layout", float),
            "GBSD focus to": ("focus_to", str), "GBSD focus mix": ("focus_mix", float)}
    for key, (field, kind) in conv.items():
        if key in pairs:
            try:
                params[field] = kind(pairs[key])
            except ValueError:
                raise ValueError(f"unreadable {key!r} value {pairs[key]!r:.40} in PNG parameters") from None
    params.update(_read_sampler(pairs))
    if "Emphasis" in pairs:  # an unknown label stays as it is, so the parameter check names it
        by_name = {v.lower(): k for k, v in EMPHASIS_NAMES.items()}
        params["emphasis"] = by_name.get(pairs["Emphasis"].strip().lower(), pairs["Emphasis"])
    if pairs.get("Pad conds v0", "").strip() == "True":
        params["chunk_padding"] = "last vector (A1111's Pad conds v0)"  # not implemented: the check refuses it
    elif pairs.get("Pad conds", "").strip() == "True":
        params["chunk_padding"] = "empty"
    extra["embeddings"] = {}
    for item in pairs.get("TI hashes", "").split(","):
        name, _, digest = item.rpartition(":")
        if name.strip() and re.fullmatch(r"[0-9a-fA-F]{1,64}", digest.strip()):
            extra["embeddings"][name.strip()] = digest.strip().lower()
    if "Size" in pairs:
        m = re.fullmatch(r"(\d+)x(\d+)", pairs["Size"])
        if not m:
            raise ValueError(f"unreadable 'Size' value {pairs['Size']!r} in PNG parameters")
        params["width"], params["height"] = int(m.group(1)), int(m.group(2))
    extra["img2img"] = img2img
    if hires:
        extra["hires"] = {**hires, "Denoising strength": pairs.get("Denoising strength")}
    extra["model_hash"] = pairs.get("Model hash")
    extra["model"] = pairs.get("Model")
    extra["lora_hashes"] = pairs.get("Lora hashes")
    extra["layout_loras"] = pairs.get("GBSD layout loras")
    for key, name in (("GBSD executed steps", "executed_steps"), ("GBSD layout steps", "layout_steps")):
        if key in pairs:
            try:
                extra[name] = int(pairs[key])
            except ValueError:
                raise ValueError(f"unreadable {key!r} value {pairs[key]!r:.40} in PNG parameters") from None
    return params, extra


def _optional(obj: dict, key: str, what: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"broken '{JSON_KEY}' metadata chunk ({what} must be text, got {type(value).__name__})")
    return value


def read_metadata(png: str | os.PathLike | Image.Image) -> dict[str, Any]:
    """{"params": {field: value}, "source": "json"|"infotext", plus model/size facts} from a PNG's text chunks (a
    path, or an image already opened). The parameters' values are checked by GenerationParams, not here; the rest of
    the structure is checked here: a PNG is anyone's file. From the JSON chunk also "json", the whole chunk (its
    "trace" / "rack" entries, when the PNG has them; their readers check what they take from them).

    Raises ValueError when the file carries neither chunk (or they are unreadable), OSError when it cannot be read.
    """
    if isinstance(png, Image.Image):
        texts = dict(getattr(png, "text", {}) or {})
    else:
        with Image.open(png) as im:
            texts = dict(getattr(im, "text", {}) or {})
    where = "" if isinstance(png, Image.Image) else f"{png}: "
    if JSON_KEY in texts:
        try:
            data = json.loads(texts[JSON_KEY])
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested beyond Python's stack
            raise ValueError(f"broken '{JSON_KEY}' metadata chunk ({type(e).__name__}: {e})"[:200]) from None
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise ValueError(f"broken '{JSON_KEY}' metadata chunk (no 'params' object)")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"broken '{JSON_KEY}' metadata chunk (model must be an object, got "
                             f"{type(model).__name__})")
        sha = _optional(model, "sha256", "model sha256")
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"broken '{JSON_KEY}' metadata chunk (model sha256 {sha!r:.80} is not 64 hex digits)")
        embeddings = data.get("embeddings") or {}
        if not isinstance(embeddings, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
                for k, v in embeddings.items()):
            raise ValueError(f"broken '{JSON_KEY}' metadata chunk (embeddings must map names to sha256 digests)")
        return {"source": "json", "params": data["params"], "model_file": _optional(model, "file", "model file"),
                "model_sha256": sha, "img2img": _optional(data, "mode", "mode") == "img2img", "json": data,
                "embeddings": embeddings}
    if INFOTEXT_KEY in texts:
        params, extra = parse_infotext(texts[INFOTEXT_KEY])
        return {"source": "infotext", "params": params, "model_file": extra["model"],
                "model_hash": extra["model_hash"], "img2img": extra["img2img"], "hires": extra.get("hires"),
                "lora_hashes": extra["lora_hashes"], "layout_loras": extra["layout_loras"],
                "embeddings": extra["embeddings"]}
    raise ValueError(f"{where}no generation parameters in this PNG (no '{JSON_KEY}' or '{INFOTEXT_KEY}' chunk)")


def params_from_dict(values: dict[str, Any]) -> GenerationParams:
    """Build GenerationParams from stored values, ignoring keys a newer/older version may have added."""
    from ..pipeline import GenerationParams

    known = {f.name for f in dataclasses.fields(GenerationParams)}
    return GenerationParams(**{k: v for k, v in values.items() if k in known})


def read_params(png_path: str | os.PathLike) -> GenerationParams:
    """The GenerationParams an image was made with (JSON chunk preferred, A1111 text as fallback)."""
    return params_from_dict(read_metadata(png_path)["params"])
