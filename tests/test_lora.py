"""Pusa LoRA loading (PEFT and ComfyUI files) and exact, non-accumulating fusing."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from pusa_model.lora import LoraFuser, SafetensorsWeights, load_lora_state_dict
from pusa_model.presets import build_tiny_lora_state_dict, tiny_transformer_config

RANK = 4


def make_transformer(dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).to(dtype).eval()


def forward(transformer: WanTransformer3DModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
            timestep=torch.tensor([500.0]),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
            return_dict=False,
        )[0]


def to_comfy(peft: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The ComfyUI form of a PEFT-keyed LoRA: ``diffusion_model.`` prefix, lora_down/lora_up, alpha keys."""
    out = {}
    for key, value in peft.items():
        module, matrix = key.split(".lora_")
        name = {"A.default.weight": "lora_down.weight", "B.default.weight": "lora_up.weight"}[matrix]
        out[f"diffusion_model.{module}.{name}"] = value
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    return out


def targeted_weights(transformer: torch.nn.Module, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {k.rsplit(".lora_", 1)[0] + ".weight" for k in lora}
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if n in names}


@pytest.fixture
def transformer() -> WanTransformer3DModel:
    return make_transformer()


@pytest.fixture
def peft_sd(transformer) -> dict[str, torch.Tensor]:
    return build_tiny_lora_state_dict(transformer, rank=RANK)


@pytest.fixture
def lora(tmp_path, peft_sd) -> dict[str, torch.Tensor]:
    save_file(peft_sd, str(tmp_path / "pusa.safetensors"))
    return load_lora_state_dict(tmp_path / "pusa.safetensors")


def test_converted_keys_are_diffusers_names(lora, peft_sd):
    assert len(lora) == len(peft_sd) == 2 * 10 * 2  # A and B, 10 linears, 2 blocks
    assert torch.equal(lora["blocks.0.attn1.to_q.lora_A.weight"], peft_sd["blocks.0.self_attn.q.lora_A.default.weight"])
    assert torch.equal(
        lora["blocks.1.attn2.to_out.0.lora_B.weight"], peft_sd["blocks.1.cross_attn.o.lora_B.default.weight"]
    )
    assert torch.equal(lora["blocks.0.ffn.net.0.proj.lora_A.weight"], peft_sd["blocks.0.ffn.0.lora_A.default.weight"])
    assert torch.equal(lora["blocks.1.ffn.net.2.lora_B.weight"], peft_sd["blocks.1.ffn.2.lora_B.default.weight"])


def test_fused_matches_peft_unfused_at_same_scale(transformer, lora):
    reference = make_transformer()
    reference.load_lora_adapter(dict(lora), adapter_name="pusa", prefix=None)
    reference.set_adapters(["pusa"], weights=[1.4])
    expected = forward(reference)

    base = forward(transformer)
    fuser = LoraFuser(transformer, lora)
    assert fuser.alpha is None
    fuser.fuse(1.4)
    assert fuser.alpha == 1.4
    fused = forward(transformer)

    assert not torch.allclose(fused, base, atol=1e-3)  # the LoRA does change the output
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_changing_alpha_never_accumulates(lora, dtype):
    model = make_transformer(dtype)
    original = targeted_weights(model, lora)
    fuser = LoraFuser(model, lora)
    fuser.fuse(1.0)
    fuser.fuse(0.3)
    fuser.fuse(1.0)
    round_trip = targeted_weights(model, lora)

    fresh_model = make_transformer(dtype)
    LoraFuser(fresh_model, lora).fuse(1.0)
    fresh = targeted_weights(fresh_model, lora)

    assert round_trip.keys() == fresh.keys() and len(fresh) == 20
    for name in fresh:
        assert round_trip[name].dtype == dtype
        assert torch.equal(round_trip[name], fresh[name]), name
        assert not torch.equal(round_trip[name], original[name]), name

    fuser.fuse(0.0)
    assert fuser.alpha == 0.0
    for name, weight in targeted_weights(model, lora).items():
        assert torch.equal(weight, original[name]), name


def test_fuse_is_w0_plus_alpha_ba(transformer, lora):
    w0 = transformer.blocks[1].ffn.net[2].weight.detach().clone()
    LoraFuser(transformer, lora).fuse(-0.7)
    a, b = lora["blocks.1.ffn.net.2.lora_A.weight"], lora["blocks.1.ffn.net.2.lora_B.weight"]
    torch.testing.assert_close(transformer.blocks[1].ffn.net[2].weight, w0 - 0.7 * (b @ a))


def test_pt_safetensors_and_comfy_files_agree(tmp_path, peft_sd):
    torch.save(peft_sd, tmp_path / "pusa.pt")
    save_file(peft_sd, str(tmp_path / "pusa.safetensors"))
    save_file(to_comfy(peft_sd, alpha=RANK), str(tmp_path / "comfy.safetensors"))

    from_pt = load_lora_state_dict(tmp_path / "pusa.pt")
    from_st = load_lora_state_dict(str(tmp_path / "pusa.safetensors"))
    from_comfy = load_lora_state_dict(tmp_path / "comfy.safetensors")

    assert len(from_pt) == 40
    for converted in (from_st, from_comfy):
        assert converted.keys() == from_pt.keys()
        for key in from_pt:
            assert torch.equal(converted[key], from_pt[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comfy_alpha_scales_delta_by_alpha_over_rank(tmp_path, peft_sd, dtype):
    peft_sd = {k: v.to(dtype) for k, v in peft_sd.items()}
    alpha = 3.0  # scale 0.75: diffusers puts all of it on A (not a power of two, so bf16 would round)
    save_file(to_comfy(peft_sd, alpha=alpha), str(tmp_path / "comfy.safetensors"))
    converted = load_lora_state_dict(tmp_path / "comfy.safetensors")
    for wan, diffusers in [("self_attn.k", "attn1.to_k"), ("cross_attn.v", "attn2.to_v"), ("ffn.0", "ffn.net.0.proj")]:
        a = peft_sd[f"blocks.1.{wan}.lora_A.default.weight"].float()
        b = peft_sd[f"blocks.1.{wan}.lora_B.default.weight"].float()
        new_a = converted[f"blocks.1.{diffusers}.lora_A.weight"].float()
        new_b = converted[f"blocks.1.{diffusers}.lora_B.weight"].float()
        delta = new_b @ new_a
        torch.testing.assert_close(delta, (alpha / RANK) * (b @ a), atol=1e-6, rtol=1e-6)


def test_safetensors_weights_as_base(tmp_path, transformer, lora):
    transformer.save_pretrained(tmp_path / "transformer")
    sharded = make_transformer()
    sharded.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    state = transformer.state_dict()
    for folder in ("transformer", "sharded"):
        weights = SafetensorsWeights(tmp_path / folder)
        assert set(weights) == set(state) and len(weights) == len(state)
        for name, value in state.items():
            assert torch.equal(weights[name], value), name
        with pytest.raises(KeyError):
            weights["blocks.9.attn1.to_q.weight"]

    snapshot_model = make_transformer()
    LoraFuser(snapshot_model, lora).fuse(1.0)
    LoraFuser(transformer, lora).fuse(5.0)  # the model's weights are no longer W0: W0 must come from disk
    disk_fuser = LoraFuser(transformer, lora, base_weights=SafetensorsWeights(tmp_path / "sharded"))
    disk_fuser.fuse(2.0)
    disk_fuser.fuse(1.0)
    for name, weight in targeted_weights(snapshot_model, lora).items():
        assert torch.equal(transformer.get_parameter(name), weight), name


def test_bad_files_raise_value_error(tmp_path, peft_sd):
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="no tensors"):
        load_lora_state_dict(tmp_path / "empty.safetensors")

    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no tensors"):
        load_lora_state_dict(tmp_path / "empty.pt")

    save_file({"text_encoder.layer.0.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="unsupported LoRA key.*text_encoder.layer.0.weight"):
        load_lora_state_dict(tmp_path / "other.safetensors")

    extra = dict(peft_sd, **{"blocks.0.norm3.weight": torch.zeros(4)})  # a weight, not a LoRA entry
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="blocks.0.norm3.weight"):
        load_lora_state_dict(tmp_path / "extra.safetensors")

    unknown = dict(peft_sd, **{"blocks.0.self_attn.norm_q.lora_A.default.weight": torch.zeros(RANK, 32),
                               "blocks.0.self_attn.norm_q.lora_B.default.weight": torch.zeros(32, RANK)})
    save_file(unknown, str(tmp_path / "unknown.safetensors"))  # no Linear there: diffusers' converter refuses
    with pytest.raises(ValueError, match="converter refused.*norm_q"):
        load_lora_state_dict(tmp_path / "unknown.safetensors")

    half = {k: v for k, v in peft_sd.items() if k != "blocks.1.cross_attn.q.lora_B.default.weight"}
    save_file(half, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="blocks.1.cross_attn.q.*lora_B"):
        load_lora_state_dict(tmp_path / "half.safetensors")

    (tmp_path / "pusa.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported LoRA file type"):
        load_lora_state_dict(tmp_path / "pusa.bin")


def test_lora_for_missing_module_raises(transformer, lora):
    extra = dict(lora)
    extra["blocks.5.attn1.to_q.lora_A.weight"] = lora["blocks.0.attn1.to_q.lora_A.weight"]
    extra["blocks.5.attn1.to_q.lora_B.weight"] = lora["blocks.0.attn1.to_q.lora_B.weight"]
    with pytest.raises(ValueError, match="blocks.5.attn1.to_q.*does not have"):
        LoraFuser(transformer, extra)


def test_lora_shape_mismatch_raises(transformer, lora):
    wrong = dict(lora)
    wrong["blocks.0.attn2.to_k.lora_A.weight"] = torch.zeros(RANK, 7)
    with pytest.raises(ValueError, match="blocks.0.attn2.to_k.*shape"):
        LoraFuser(transformer, wrong)

    wrong_rank = dict(lora)
    wrong_rank["blocks.0.attn2.to_k.lora_B.weight"] = torch.zeros(32, RANK + 1)
    with pytest.raises(ValueError, match="blocks.0.attn2.to_k.*B @ A"):
        LoraFuser(transformer, wrong_rank)

    unpaired = {k: v for k, v in lora.items() if k != "blocks.1.ffn.net.2.lora_A.weight"}
    with pytest.raises(ValueError, match="blocks.1.ffn.net.2.*lora_A"):
        LoraFuser(transformer, unpaired)


def test_base_weights_missing_a_target_raises(transformer, lora):
    base = {n: p.detach().clone() for n, p in transformer.named_parameters() if n != "blocks.0.attn1.to_v.weight"}
    with pytest.raises(ValueError, match="blocks.0.attn1.to_v.weight"):
        LoraFuser(transformer, lora, base_weights=base)
