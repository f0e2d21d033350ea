"""The per-frame DiT path equals diffusers' stock per-token path, and its speed options change nothing."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from torch._dynamo.utils import counters

from pusa_model.dit import DiTStage
from pusa_model.lora import LoraFuser
from pusa_model.presets import tiny_transformer_config
from pusa_model.transformer import (
    DiTOptions,
    compile_block_forward,
    forward_per_frame,
    fuse_qkv,
    per_token_timesteps,
    select_attention_backend,
)


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


def _copy(model: WanTransformer3DModel, **config) -> WanTransformer3DModel:
    """A fresh tiny model (config overrides allowed) with `model`'s weights where they fit."""
    out = WanTransformer3DModel(**{**tiny_transformer_config(), **config}).eval()
    out.load_state_dict(model.state_dict(), strict=False)
    return out


def _inputs(frames: int = 3, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 16, frames, 8, 12, generator=gen),
        torch.rand(1, frames, generator=gen) * 1000,
        torch.randn(1, 6, 32, generator=gen),
    )


def test_compiled_blocks_equal_eager_with_one_graph_for_all_blocks():
    torch.manual_seed(3)
    four = WanTransformer3DModel(**{**tiny_transformer_config(), "num_layers": 4}).eval()
    x, tau, text = _inputs()
    torch._dynamo.reset()
    counters.clear()
    # aot_eager traces exactly what inductor gets (dynamo + AOTAutograd) without minutes of C++ builds;
    # bench/dit_forward.py --tiny runs the inductor path.
    block_fn = compile_block_forward(backend="aot_eager")
    with torch.no_grad():
        eager = forward_per_frame(four, x, tau, text)
        compiled = forward_per_frame(four, x, tau, text, block_fn)
        again = forward_per_frame(four, x, tau.flip(1), text, block_fn)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (again - compiled).abs().max() > 1e-3
    # Four blocks, two calls: traced and compiled once.
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["total"] == 1
    torch._dynamo.reset()


def test_select_attention_backend_on_cpu(model):
    local = _copy(model)
    x, tau, text = _inputs()
    with torch.no_grad():
        expected = forward_per_frame(local, x, tau, text)
    try:
        assert select_attention_backend(local, "auto") == "native"
        assert select_attention_backend(local, "flash") == "native"  # no flash-attn, no CUDA
        assert select_attention_backend(local, "_native_math") == "_native_math"
        assert {p._attention_backend for p in local.attn_processors.values()} == {"_native_math"}
        with torch.no_grad():
            torch.testing.assert_close(forward_per_frame(local, x, tau, text), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError):
            select_attention_backend(local, "no-such-kernel")
    finally:
        select_attention_backend(local, "native")  # also diffusers' process-wide active backend


def test_fused_qkv_is_equal_and_shares_weights(model):
    fused = _copy(model)
    fuse_qkv(fused)
    attn1, attn2 = fused.blocks[0].attn1, fused.blocks[0].attn2
    assert attn1.fused_projections and attn2.fused_projections
    assert attn1.to_q.weight.data_ptr() == attn1.to_qkv.weight.data_ptr()
    assert attn2.to_k.weight.data_ptr() == attn2.to_kv.weight.data_ptr()
    x, tau, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            forward_per_frame(fused, x, tau, text), forward_per_frame(model, x, tau, text), rtol=1e-5, atol=1e-5
        )


def test_dit_stage_options_follow_lora_alpha(model):
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for name in ("blocks.0.attn1.to_k", "blocks.1.attn2.to_v", "blocks.1.attn1.to_q"):
        lora[f"{name}.lora_A.weight"] = torch.randn(4, 32, generator=gen)
        lora[f"{name}.lora_B.weight"] = torch.randn(32, 4, generator=gen)
    plain, fast = _copy(model), _copy(model)
    plain_stage = DiTStage(plain, LoraFuser(plain, lora))
    fast_stage = DiTStage(fast, LoraFuser(fast, lora), DiTOptions(attention="auto", fuse_qkv=True))
    x, tau, text = _inputs()
    outs = []
    for alpha in (1.4, 0.5):
        plain_stage.set_lora_alpha(alpha)
        fast_stage.set_lora_alpha(alpha)
        with torch.no_grad():
            outs.append(fast_stage.velocity(x, tau, text))
            torch.testing.assert_close(outs[-1], plain_stage.velocity(x, tau, text), rtol=1e-5, atol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
