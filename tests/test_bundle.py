"""SDBundle (gbsd_core/bundle.py): prompt embeddings, latents to images and back."""
from __future__ import annotations

from pathlib import Path

import torch

from gbsd_core.loading import load


def test_bundle_image_helpers(tiny_ckpt: Path) -> None:
    b = load(tiny_ckpt)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    images = b.decode_latents(latents)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"  # the VAE's factor 8
    ref = ((b.vae.decode(latents / 0.18215) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0) * 255
    import numpy as np

    assert np.abs(np.asarray(images[0], dtype=np.float32) - ref.numpy()).max() <= 0.5 + 1e-3
    z = b.encode_images(images, sample=False)
    assert z.shape == (2, 4, 4, 4)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    assert torch.allclose(z, b.vae.encode(x / 127.5 - 1).mean * 0.18215)
    z1 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    z2 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
