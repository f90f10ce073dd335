"""Textual-inversion embeddings: learned token vectors that a prompt names by the file's stem.

Textual inversion (Gal et al. 2022, arXiv 2208.01618) learns n new token embeddings for a concept and leaves the
model as it is; a prompt that names the concept gets those n vectors where a word's token embedding would be, before
the text transformer runs (chunks.py places them, encode.py splices them in). The files people have, by layout:

    A1111 .pt        {"string_to_param": {"*": [n, D]}, "name": ..., "step": ..., ...}   (a pickle)
    A1111 .safetensors / newer .pt                    {"emb_params": [n, D]}
    diffusers        learned_embeds.bin / .safetensors {"<token>": [n, D] or [D]}        (one entry)
    SDXL             {"clip_l": [n, 768], "clip_g": [n, 1280]}                           (one set per text tower)

The name a prompt uses is the file's stem, as in A1111 (`EasyNegative.safetensors` -> "EasyNegative"; the token or
"name" stored inside is ignored). A name is matched by its CLIP tokens, so case does not matter. A word that looks
like a file stem but has no file is plain text, as in A1111.

An embedding must fit the model's text towers: one [n, D] tensor for the single tower of SD1 (D = 768) or SD2
(1024); both `clip_l` and `clip_g` for SDXL base, `clip_g` for the refiner. Anything else is refused by name
(an SD1 embedding on SD2 or SDXL would otherwise be silently skipped, as A1111 does, or fail inside a matmul).
Pickles are read with `torch.load(weights_only=True)` (readers.py): a file that needs code to load is refused.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..readers import read_pickle, read_safetensors
from .chunks import NameLookup, name_lookup
from .parser import PromptError

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75  # an embedding must fit in one 75-token chunk (A1111 moves it whole to the next chunk)
SDXL_KEYS = ("clip_l", "clip_g")  # the towers of an SDXL embedding file, by the names the community files use
SINGLE = ""  # the key of a one-tower embedding (SD1's CLIP-L, SD2's OpenCLIP-H)


@dataclass(frozen=True)
class Embedding:
    """One embedding file: `vectors` maps a tower key ("" for one-tower files, "clip_l" / "clip_g" for SDXL files) to
    fp32 vectors [n, D]; every tower has the same n."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        """n: how many token positions the embedding takes."""
        return next(iter(self.vectors.values())).shape[0]

    def describe(self) -> str:
        widths = ", ".join(f"{k or 'one tower'} {v.shape[1]}" for k, v in self.vectors.items())
        return f"{self.length} vectors ({widths} wide)"


@dataclass(frozen=True)
class Tower:
    """What an embedding must match in one text tower: the key its file uses and the tower's width."""

    key: str  # SINGLE, "clip_l" or "clip_g"
    width: int


def read_embedding(path: str | Path) -> Embedding:
    """An embedding file in any of the four layouts (module docstring), checked: one set of finite float vectors
    [n, D] with 1 <= n <= MAX_VECTORS. Raises PromptError naming the file and the problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise PromptError(f"embedding {path}: unknown file type {suffix!r} (expected {', '.join(EMBEDDING_SUFFIXES)})")
    try:
        data = read_safetensors(path)[0] if suffix == ".safetensors" else read_pickle(path)
    except ValueError as e:  # readers.CheckpointError: not a regular file, corrupt, needs code to unpickle
        raise PromptError(f"embedding {e}") from None
    vectors = _vectors(data, path)
    n = {v.shape[0] for v in vectors.values()}
    if len(n) != 1:
        raise PromptError(f"embedding {path}: its towers have different vector counts {sorted(n)}")
    if not 1 <= n.pop() <= MAX_VECTORS:
        raise PromptError(f"embedding {path}: {next(iter(vectors.values())).shape[0]} vectors; an embedding takes 1 "
                          f"to {MAX_VECTORS} token positions")
    return Embedding(path.stem, path, vectors)


def _vectors(data: object, path: Path) -> dict[str, torch.Tensor]:
    """The layout of `data` (module docstring) -> {tower key: fp32 [n, D]}."""
    if not isinstance(data, dict):
        raise PromptError(f"embedding {path}: holds a {type(data).__name__}, not an embedding's dictionary")
    if "string_to_param" in data:  # A1111's .pt: one term "*"
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise PromptError(f"embedding {path}: 'string_to_param' must hold exactly one tensor")
        found = {SINGLE: next(iter(params.values()))}
    elif "emb_params" in data:
        found = {SINGLE: data["emb_params"]}
    elif any(k in data for k in SDXL_KEYS):
        found = {k: data[k] for k in SDXL_KEYS if k in data}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1 or len(data) != 1:  # diffusers' {token: tensor}
            keys = ", ".join(repr(k) for k in list(data)[:5])
            raise PromptError(f"embedding {path}: not an embedding layout gbsd knows (keys {keys}; expected "
                              "'string_to_param', 'emb_params', 'clip_l'/'clip_g', or one token's tensor)")
        found = {SINGLE: next(iter(tensors.values()))}
    out = {}
    for key, t in found.items():
        where = f"embedding {path}" + (f" ({key})" if key else "")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.layout != torch.strided:
            raise PromptError(f"{where}: the vectors are a {getattr(t, 'dtype', type(t).__name__)}, not a float tensor")
        if t.ndim == 1:  # diffusers and A1111 read a [D] tensor as one vector
            t = t[None]
        if t.ndim != 2:
            raise PromptError(f"{where}: vectors of shape {list(t.shape)}, expected [n, width]")
        t = t.detach().to(torch.float32).clone()
        if not bool(torch.isfinite(t).all()):
            raise PromptError(f"{where}: holds NaN or inf values")
        out[key] = t
    return out


def fit(embedding: Embedding, towers: Sequence[Tower], family: str = "") -> None:
    """Refuse `embedding` by name unless it has vectors of the right width for every text tower of the model (its
    family's name, e.g. "sd1", goes into the message)."""
    family = f"{family} " if family else ""
    keys = set(embedding.vectors)
    one_tower = keys == {SINGLE}
    if len(towers) == 1 and towers[0].key == SINGLE:
        if not one_tower:
            raise PromptError(f"embedding {embedding.name!r} ({embedding.path.name}) is an SDXL embedding "
                              f"({', '.join(sorted(keys))}); this {family}model has one text tower")
    elif one_tower:
        raise PromptError(f"embedding {embedding.name!r} ({embedding.path.name}) is one [n, D] tensor (an SD1/SD2 "
                          f"embedding); this {family}model needs {' and '.join(t.key for t in towers)} vectors")
    for tower in towers:
        if tower.key not in embedding.vectors:
            raise PromptError(f"embedding {embedding.name!r} ({embedding.path.name}) has no {tower.key} vectors, "
                              f"which this {family}model's text encoder needs")
        width = embedding.vectors[tower.key].shape[1]
        if width != tower.width:
            what = f"{tower.key} " if tower.key else ""
            raise PromptError(f"embedding {embedding.name!r} ({embedding.path.name}) has {what}vectors {width} wide; "
                              f"this {family}model's text tower is {tower.width} wide (an embedding made for "
                              "another model family)")


class EmbeddingLibrary:
    """The embeddings a prompt may name: explicit files (`--embedding PATH`) and a folder (the weights folder's
    `embeddings/`), by file stem. Only file names are read up front; a file is read when a prompt first names it.
    An explicit file wins over a folder file of the same stem; two explicit files of one stem are refused."""

    def __init__(self, files: Sequence[str | Path] = (), folder: str | Path | None = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._paths: dict[str, list[Path]] = {}
        if self.folder is not None and self.folder.is_dir():
            for p in sorted(self.folder.iterdir()):
                if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file():
                    self._paths.setdefault(p.stem, []).append(p)
        explicit: dict[str, Path] = {}
        for f in files:
            p = Path(f)
            if p.suffix.lower() not in EMBEDDING_SUFFIXES:
                raise PromptError(f"--embedding {p}: expected a {', '.join(EMBEDDING_SUFFIXES)} file")
            if not p.is_file():
                raise PromptError(f"--embedding {p}: {'not a regular file' if p.exists() else 'no such file'}")
            if p.stem in explicit and explicit[p.stem] != p:
                raise PromptError(f"--embedding {p}: a second embedding named {p.stem!r} (also {explicit[p.stem]})")
            explicit[p.stem] = p
        self._paths.update({name: [p] for name, p in explicit.items()})
        self._loaded: dict[str, Embedding] = {}
        self._lookup: NameLookup | None = None

    def names(self) -> list[str]:
        return sorted(self._paths)

    def lookup(self, encode: Callable[[str], list[int]]) -> NameLookup:
        """The names by their token ids (chunks.name_lookup), made once: `encode` is CLIP's BPE, the same for every
        model."""
        if self._lookup is None:
            self._lookup = name_lookup(self.names(), encode)
        return self._lookup

    def get(self, name: str) -> Embedding:
        """The embedding named `name`, read on first use."""
        if name not in self._loaded:
            paths = self._paths[name]
            if len(paths) > 1:
                raise PromptError(f"embedding {name!r} is {len(paths)} files in {self.folder}: "
                                  f"{', '.join(p.name for p in paths)} (keep one)")
            self._loaded[name] = read_embedding(paths[0])
        return self._loaded[name]

    def __repr__(self) -> str:
        return f"EmbeddingLibrary({len(self._paths)} names, folder={self.folder})"
