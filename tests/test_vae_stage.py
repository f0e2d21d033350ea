"""The VAE stage: normalised round trip shapes, concurrent calls on one model, the chunked (causal)
decode and the MP4 written from it, and decoding in bf16."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from pusa_model import media
from pusa_model.engine import decode_to_mp4, decode_video_files
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


def test_decode_chunks_are_the_causal_decode_latent_by_latent(tiny_folder):
    vae = AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval()
    stage = VAEStage(vae)
    latents = torch.randn(1, 16, 5, 6, 8, generator=torch.Generator().manual_seed(5))
    chunks = list(stage.decode_chunks(latents))
    assert [c.shape[1] for c in chunks] == [1, 4, 4, 4, 4]
    with torch.no_grad():  # diffusers' own decode of the same (de-normalised) latents
        expected = vae.decode(latents * stage._std + stage._mean).sample[0]
    assert torch.equal(torch.cat(chunks, dim=1), expected)
    assert torch.equal(stage.decode(latents), expected)

    # When tiling splits the frame, the whole video is one chunk from diffusers' tiled decode.
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                      tile_sample_stride_height=16, tile_sample_stride_width=16)
    (whole,) = stage.decode_chunks(latents)
    with torch.no_grad():
        tiled = vae.decode(latents * stage._std + stage._mean).sample[0].clamp(-1, 1)
    assert torch.equal(whole, tiled) and not torch.equal(whole, expected)


def test_decode_dtype_decodes_in_bfloat16_and_leaves_encoding_alone(tiny_folder):
    exact = VAEStage(AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval())
    bf16 = VAEStage(AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval(), decode_dtype=torch.bfloat16)
    assert bf16.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert bf16.vae.encoder.conv_in.weight.dtype == torch.float32
    pixels = torch.rand(3, 9, 32, 48) * 2 - 1
    assert torch.equal(exact.encode(pixels), bf16.encode(pixels))
    latents = exact.encode(pixels)
    a, b = exact.decode(latents), bf16.decode(latents)
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # bf16 arithmetic rounds differently ...
    assert (a - b).abs().max() < 0.1  # ... to the same pixels within a few uint8 levels


def test_decode_to_mp4_writes_the_frames_as_they_decode(tiny_folder, tmp_path):
    stage = VAEStage(AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval())
    latents = torch.randn(1, 16, 4, 6, 8, generator=torch.Generator().manual_seed(6))
    frames = decode_to_mp4(stage, latents, tmp_path / "streamed.mp4", fps=16)
    assert np.array_equal(frames, media.frames_to_uint8(stage.decode(latents)))
    media.write_mp4(frames, tmp_path / "after.mp4", fps=16)  # the serial way: decode, then encode
    assert (tmp_path / "streamed.mp4").read_bytes() == (tmp_path / "after.mp4").read_bytes()
    assert decode_video_files(stage, latents, fps=16) == media.video_files(frames, 16)  # the service's bytes


def test_conditioning_is_decoded_within_the_limits_given(tiny_pipeline, tmp_path):
    """The VAE decodes uploads within the deployment's api.media (passed in), not the library's defaults: a
    deployment that lowers them refuses there too, one that raises them accepts what its Router admitted."""
    import pytest
    from PIL import Image

    from pusa_model.errors import InvalidRequest
    from pusa_model.engine import encode_conditioning
    from pusa_model.request import parse_request, plan_request

    image = tmp_path / "start.png"
    Image.new("RGB", (200, 100), (200, 30, 30)).save(image)
    plan = plan_request(parse_request({"prompt": "p", "task": "i2v", "images": [str(image)], "steps": 1}),
                        tiny_pipeline.preset)
    accepted = encode_conditioning(tiny_pipeline.vae, plan)
    with pytest.raises(InvalidRequest, match="exceeds the limit of 10000 pixels"):
        encode_conditioning(tiny_pipeline.vae, plan, limits=media.MediaLimits(max_pixels=10_000))
    raised = encode_conditioning(tiny_pipeline.vae, plan, limits=media.MediaLimits(max_pixels=100_000))
    assert torch.equal(raised, accepted)
