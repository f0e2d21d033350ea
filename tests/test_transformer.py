"""The per-frame DiT path equals diffusers' stock per-token path."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from pusa_model.presets import tiny_transformer_config
from pusa_model.transformer import forward_per_frame, per_token_timesteps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).eval()


@pytest.mark.parametrize("shape", [(1, 5, 8, 12), (2, 3, 16, 8), (1, 1, 4, 4)])
def test_per_frame_equals_per_token(model, shape):
    batch, frames, height, width = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, frames, height, width, generator=gen)
    text = torch.randn(batch, 12, 32, generator=gen)
    tau = torch.rand(batch, frames, generator=gen) * 1000
    tokens_per_frame = (height // 2) * (width // 2)
    with torch.no_grad():
        ours = forward_per_frame(model, x, tau, text)
        stock = model(x, timestep=per_token_timesteps(tau, tokens_per_frame), encoder_hidden_states=text).sample
    assert ours.shape == stock.shape == x.shape
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    # The timesteps matter: a different vector gives a different prediction.
    with torch.no_grad():
        other = forward_per_frame(model, x, tau.flip(1) + 1, text)
    assert (other - ours).abs().max() > 1e-3


def test_constant_vector_equals_scalar_timestep(model):
    x = torch.randn(1, 16, 4, 8, 8)
    text = torch.randn(1, 7, 32)
    with torch.no_grad():
        ours = forward_per_frame(model, x, torch.full((1, 4), 731.0), text)
        stock = model(x, timestep=torch.tensor([731.0]), encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_close_to_per_token(model):
    bf16 = WanTransformer3DModel(**tiny_transformer_config()).eval()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    x = torch.randn(1, 16, 3, 8, 8, dtype=torch.bfloat16)
    text = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    tau = torch.tensor([[0.0, 500.0, 1000.0]])
    with torch.no_grad():
        ours = forward_per_frame(bf16, x, tau, text).float()
        stock = bf16(x, timestep=per_token_timesteps(tau, 16), encoder_hidden_states=text).sample.float()
    assert (ours - stock).abs().max() < 0.05


def test_rejects_mismatched_timesteps(model):
    with pytest.raises(ValueError, match="frame_timesteps"):
        forward_per_frame(model, torch.randn(1, 16, 3, 4, 4), torch.zeros(1, 2), torch.randn(1, 4, 32))
