"""Stacked LoRAs (issue 13): two LoRAs fused equal peft's unfused adapters, switching combinations is exact,
LightX2V/ComfyUI ``diff``/``diff_b`` keys are applied, the registry and a request's ``loras`` and ``mode:
fast`` resolve as documented, and the DiT stage fuses only when the combination changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from safetensors.torch import save_file
from test_lora import forward

from pusa_cli import main as cli_main
from pusa_model.dit import DiTStage
from pusa_model.errors import InvalidRequest
from pusa_model.lora import LoraStack, load_lora_state_dict
from pusa_model.loras import PUSA, LoraRegistry, combination_id, lora_path, parse_combination_id
from pusa_model.pipeline import load_dit_stage
from pusa_model.presets import (
    build_tiny_distill_lora_state_dict,
    build_tiny_lora_state_dict,
    get_preset,
    tiny_transformer_config,
)
from pusa_model.request import parse_request, plan_request

TINY = get_preset("tiny")


def make_transformer(dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).to(dtype).eval().requires_grad_(False)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The Pusa LoRA (PEFT keys) and a distill LoRA (LightX2V keys: lora_down/up, alpha, diff, diff_b),
    with and without its norm and modulation diffs."""
    folder = tmp_path_factory.mktemp("loras")
    model = make_transformer()
    out = {"pusa": folder / "pusa.safetensors", "distill": folder / "distill.safetensors",
           "distill_linear": folder / "distill_linear.safetensors"}
    save_file(build_tiny_lora_state_dict(model), str(out["pusa"]))
    save_file(build_tiny_distill_lora_state_dict(model), str(out["distill"]))
    save_file(build_tiny_distill_lora_state_dict(model, norms=False), str(out["distill_linear"]))
    return out


def as_peft(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loaded LoRA in the form diffusers' peft loader takes: a Linear's bias diff is peft's lora_B.bias."""
    out = {}
    for key, value in lora.items():
        if key.endswith(".bias.diff"):
            out[key.removesuffix(".bias.diff") + ".lora_B.bias"] = value
        else:
            assert not key.endswith(".diff"), key  # peft has no form for other diffs
            out[key] = value
    return out


def test_two_loras_fused_equal_peft_unfused_adapters(files):
    pusa, distill = load_lora_state_dict(files["pusa"]), load_lora_state_dict(files["distill_linear"])
    assert any(k.endswith(".bias.diff") for k in distill)  # the diff_b keys are in play

    reference = make_transformer()
    reference.load_lora_adapter(as_peft(pusa), adapter_name="pusa", prefix=None)
    reference.load_lora_adapter(as_peft(distill), adapter_name="distill", prefix=None)
    reference.set_adapters(["pusa", "distill"], weights=[1.4, 0.7])
    expected = forward(reference)

    model = make_transformer()
    base = forward(model)
    stack = LoraStack(model, {PUSA: pusa, "distill": distill})
    assert stack.fuse({PUSA: 1.4, "distill": 0.7})
    fused = forward(model)
    assert not torch.allclose(fused, base, atol=1e-3)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)

    reference.set_adapters(["pusa"], weights=[1.4])  # and one of them alone (the distill LoRA unfused)
    assert stack.fuse({PUSA: 1.4})
    torch.testing.assert_close(forward(model), forward(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_b_a_over_combinations_is_exact(files, dtype):
    loras = {PUSA: load_lora_state_dict(files["pusa"]), "distill": load_lora_state_dict(files["distill"])}
    a, b = {PUSA: 1.4}, {PUSA: 1.0, "distill": 1.0}

    model = make_transformer(dtype)
    w0 = params(model)
    stack = LoraStack(model, loras)
    stack.fuse(a)
    at_a = params(model)
    stack.fuse(b)
    at_b = params(model)
    stack.fuse(a)
    again = params(model)

    fresh = make_transformer(dtype)
    LoraStack(fresh, loras).fuse(b)
    changed = [n for n in w0 if not torch.equal(at_b[n], w0[n])]
    assert len(changed) > 40 and any("norm" in n for n in changed) and any("scale_shift" in n for n in changed)
    for name in w0:
        assert torch.equal(again[name], at_a[name]), name  # a -> b -> a: bit for bit
        assert torch.equal(at_b[name], fresh.get_parameter(name)), name  # b after a == b from scratch
    assert stack.fuses == 3 and stack.combination == a
    assert not stack.fuse({PUSA: 1.4})  # already fused: nothing written
    assert stack.fuses == 3
    stack.fuse({})
    for name, weight in params(model).items():
        assert torch.equal(weight, w0[name]), name  # nothing fused: W0 exactly


def test_diff_and_diff_b_keys_are_applied(files):
    raw_keys = set(build_tiny_distill_lora_state_dict(make_transformer()))
    lora = load_lora_state_dict(files["distill"])
    # diffusers' converter drops the norm and modulation diffs; ours keeps every one, in diffusers names
    dropped = {k for k in WanLoraLoaderMixin.lora_state_dict(
        {k: v for k, v in build_tiny_distill_lora_state_dict(make_transformer()).items()}) if "norm" in k}
    assert not dropped and "diffusion_model.blocks.0.norm3.diff" in raw_keys
    for name in ("blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.1.attn1.norm_q.weight",
                 "blocks.1.attn2.norm_k.weight", "blocks.0.scale_shift_table", "blocks.1.attn2.to_out.0.bias",
                 "blocks.0.ffn.net.0.proj.bias", "proj_out.bias"):
        assert f"{name}.diff" in lora, name
    assert len(lora) == len(raw_keys) - 20  # 20 alpha keys folded into A

    model = make_transformer()
    w0 = params(model)
    LoraStack(model, {"distill": lora}).fuse({"distill": 0.6})
    for name in ("blocks.0.norm2.weight", "blocks.1.attn1.norm_q.weight", "blocks.0.scale_shift_table", "proj_out.bias",
                 "blocks.1.ffn.net.2.bias"):
        expected = w0[name].float() + 0.6 * lora[f"{name}.diff"].float()
        assert torch.equal(model.get_parameter(name), expected), name
    # lora_down / lora_up with alpha: delta = (alpha / rank) * up @ down
    raw = build_tiny_distill_lora_state_dict(make_transformer())
    down, up = raw["diffusion_model.blocks.1.cross_attn.k.lora_down.weight"], raw["diffusion_model.blocks.1.cross_attn.k.lora_up.weight"]
    torch.testing.assert_close(model.get_parameter("blocks.1.attn2.to_k.weight"),
                               w0["blocks.1.attn2.to_k.weight"] + 0.6 * 0.5 * (up @ down), atol=1e-6, rtol=1e-6)


def test_diff_for_a_missing_or_misshapen_parameter_raises(files):
    lora = load_lora_state_dict(files["distill"])
    with pytest.raises(ValueError, match="blocks.7.norm2.weight.*does not have"):
        LoraStack(make_transformer(), {"x": {**lora, "blocks.7.norm2.weight.diff": torch.zeros(32)}})
    with pytest.raises(ValueError, match="diff for 'blocks.0.norm2.weight' is \\(3,\\)"):
        LoraStack(make_transformer(), {"x": {**lora, "blocks.0.norm2.weight.diff": torch.zeros(3)}})
    with pytest.raises(KeyError, match="unknown LoRA 'style'"):
        LoraStack(make_transformer(), {"x": lora}).fuse({"style": 1.0})


REGISTRY = LoraRegistry.model_validate({"distill": {"path": "distill.safetensors", "alpha": 1.0, "fast": True},
                                        "style": {"path": "/loras/style.safetensors", "alpha": 0.5}})


def plan(registry: LoraRegistry = REGISTRY, **fields):
    return plan_request(parse_request({"prompt": "a cat", **fields}), TINY, loras=registry)


def test_fast_mode_plans_four_steps_without_an_unconditional_pass():
    fast = plan(mode="fast").describe()
    assert len(fast["steps"]) == 4 and fast["guidance"] == 1.0 and fast["cfg_passes_per_step"] == 1
    assert fast["mode"] == "fast" and fast["loras"] == [{"name": "distill", "alpha": 1.0}]
    assert plan(mode="fast").lora_combination == {PUSA: 1.4, "distill": 1.0}

    standard = plan().describe()
    assert len(standard["steps"]) == 10 and standard["cfg_passes_per_step"] == 2 and standard["loras"] == []
    # the fields a request gives win; with no fast LoRA in the registry mode fast is steps and guidance only
    assert plan(mode="fast", steps=6).request.steps == 6
    bare = plan(LoraRegistry(), mode="fast")
    assert (bare.request.steps, bare.request.guidance, bare.lora_combination) == (4, 1.0, {PUSA: 1.4})
    # a listed fast LoRA is not added twice; alpha 0 leaves it out of the combination
    assert plan(mode="fast", loras=[{"name": "distill", "alpha": 0.8}]).lora_combination == {PUSA: 1.4, "distill": 0.8}
    assert plan(mode="fast", loras=[{"name": "distill", "alpha": 0}]).lora_combination == {PUSA: 1.4}


def test_request_loras_resolve_against_the_registry():
    p = plan(lora_alpha=4.5, loras=[{"name": "style"}, {"name": "distill", "alpha": 2.5}])
    assert p.lora_combination == {PUSA: 4.5, "style": 0.5, "distill": 2.5}
    assert [c.model_dump() for c in p.request.loras] == [{"name": "style", "alpha": 0.5}, {"name": "distill", "alpha": 2.5}]
    assert plan(loras='[{"name": "style"}]').lora_combination == {PUSA: 1.4, "style": 0.5}  # a form field: JSON
    # the stored request is resolved: re-planned without the registry (as runners do) it fuses the same
    stored = plan_request(parse_request(p.request.model_dump()), TINY)
    assert stored.lora_combination == p.lora_combination
    for fields, field, reason in [
        ({"loras": [{"name": "anime"}]}, "loras[0].name", "unknown LoRA 'anime' (this deployment has: distill, style)"),
        ({"loras": [{"name": "style"}, {"name": "style"}]}, "loras[1].name", "listed twice"),
        ({"loras": [{"name": PUSA}]}, "loras[0].name", "lora_alpha"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            plan(**fields)
        assert info.value.field == field and reason in info.value.reason


def test_registry_and_combination_ids(files):
    for bad, reason in [({"pusa": {"path": "x"}}, "Pusa LoRA"), ({"a=b": {"path": "x"}}, "letters"),
                        ({"a": {"path": "x", "fast": True}, "b": {"path": "y", "fast": True}}, "only one"),
                        ({"a": {"path": "x", "alpha": 9}}, "less than or equal to 5")]:
        with pytest.raises(ValueError, match=reason):
            LoraRegistry.model_validate(bad)
    combo = {PUSA: 1.4, "distill": 1.0, "style": 0.30000000000000004}
    assert combination_id(combo) == "distill=1.0,pusa=1.4,style=0.30000000000000004"
    assert parse_combination_id(combination_id(combo)) == combo
    assert parse_combination_id("alpha=1.4") == {PUSA: 1.4}  # an older runner's id
    # a registry path: absolute, or relative to the model folder (s3:// objects: tests/test_loading.py)
    folder = files["distill"].parent
    assert lora_path("distill.safetensors", folder) == lora_path(str(files["distill"]), Path("/elsewhere")) == files["distill"]
    with pytest.raises(ValueError, match="does not exist"):
        lora_path("missing.safetensors", folder)


@pytest.fixture(scope="module")
def stage(tiny_folder, files) -> DiTStage:
    registry = LoraRegistry.model_validate({"distill": {"path": str(files["distill"]), "fast": True}})
    return load_dit_stage(tiny_folder, TINY, "cpu", loras=registry, lora_base="cpu")


def test_dit_stage_fuses_only_when_the_combination_changes(stage, tiny_folder, files):
    start = stage.fuses
    assert stage.set_loras({PUSA: 1.4, "distill": 1.0})
    assert not stage.set_loras({PUSA: 1.4, "distill": 1.0})
    assert stage.set_lora_alpha(1.4) and stage.loras == {PUSA: 1.4} and stage.lora_alpha == 1.4
    assert stage.fuses == start + 2
    with pytest.raises(InvalidRequest) as info:
        stage.set_loras({PUSA: 1.4, "style": 1.0})
    assert info.value.field == "loras" and "holds no LoRA 'style' (it holds: distill)" in info.value.reason

    # base weights from disk (the checkpoint) give the very weights of the resident copy
    registry = LoraRegistry.model_validate({"distill": {"path": str(files["distill"])}})
    disk = load_dit_stage(tiny_folder, TINY, "cpu", loras=registry, lora_base="disk")
    disk.set_loras({PUSA: 0.5, "distill": 2.0})
    stage.set_loras({PUSA: 0.5, "distill": 2.0})
    for name, weight in disk.transformer.named_parameters():
        assert torch.equal(weight, stage.transformer.get_parameter(name)), name


def test_cli_fast_dry_run_and_unknown_lora(tmp_path, files, capsys):
    registry = tmp_path / "loras.yaml"
    registry.write_text(json.dumps({"distill": {"path": str(files["distill"]), "fast": True}}))
    cmd = ["generate", "--prompt", "a cat", "--dry-run", "--json"]
    assert cli_main([*cmd, "--fast", "--lora-registry", str(registry)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert len(described["steps"]) == 4 and described["cfg_passes_per_step"] == 1
    assert described["loras"] == [{"name": "distill", "alpha": 1.0}] and described["mode"] == "fast"
    assert cli_main([*cmd, "--lora", "anime=0.5"]) == 2
    assert "loras[0].name: unknown LoRA 'anime' (this deployment has: none)" in capsys.readouterr().err


def test_batch_rows_take_loras_and_fast_mode_and_run_grouped_by_combination(tiny_folder, files):
    """A manifest row is read as the API reads a request (`prepare`), and the driver orders rows so that
    a DiT actor (`Denoising`, here in this process) re-fuses once per combination, not per row or step."""
    import pickle

    import numpy as np

    from pusa_batch.run import _lora_key
    from pusa_batch.stages import Denoising, prepare
    from pusa_model.engine import State

    registry = {"distill": {"path": str(files["distill"]), "fast": True}}
    rows = [{"custom_id": f"r{i}", "prompt": "a cat", "seed": i, **fields} for i, fields in enumerate(
        [{"mode": "fast"}, {"steps": 2, "guidance": 1.0}, {"mode": "fast", "lora_alpha": 1.4}, {"steps": 2, "guidance": 1.0}])]
    payloads = [pickle.loads(prepare({"custom_id": r["custom_id"], "row": json.dumps(r)}, "tiny", None, registry)["payload"])
                for r in sorted(rows, key=_lora_key)]
    assert [p["custom_id"] for p in payloads] == ["r0", "r2", "r1", "r3"]  # grouped by combination
    fast = payloads[0]["plan"].request.model_dump()
    assert (fast["steps"], fast["guidance"], fast["loras"]) == (4, 1.0, [{"name": "distill", "alpha": 1.0}])
    bad = pickle.loads(prepare({"custom_id": "x", "row": json.dumps({"prompt": "p", "loras": [{"name": "anime"}]})},
                               "tiny", None, registry)["payload"])
    assert bad["error"]["param"] == "loras[0].name"

    denoise = Denoising("tiny", "cpu", loras=registry, lora_base="cpu")
    text = (np.random.default_rng(0).standard_normal((1, 8, 32)).astype(np.float32), None)
    for payload in payloads:
        denoise.process({**payload, "state": State(text=text)})
    assert denoise.refuses == 2 and denoise.stage.fuses == 2  # 4 rows, 12 steps, 2 combinations
