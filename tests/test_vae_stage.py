"""The VAE stage: normalised round trip shapes, and concurrent calls on one model stay correct."""

from concurrent.futures import ThreadPoolExecutor

import torch
from diffusers import AutoencoderKLWan

from pusa_model.vae import VAEStage


def test_shapes_and_concurrent_decodes_match_serial(tiny_folder):
    stage = VAEStage(AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval())
    latents = stage.encode(torch.rand(3, 9, 32, 48) * 2 - 1)
    assert latents.shape == (1, 16, 3, 4, 6)
    inputs = [torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    serial = [stage.decode(z) for z in inputs]
    assert serial[0].shape == (3, 9, 32, 48)
    with ThreadPoolExecutor(4) as pool:  # the Wan VAE caches per call on the module
        parallel = list(pool.map(stage.decode, inputs))
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
