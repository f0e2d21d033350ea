"""Pusa-Wan2.2, the two-expert model, on the tiny two-expert preset (``tiny-wan2.2``, CPU): the expert of each
step follows the boundary rule; the sampler equals an independent reimplementation of the Pusa authors'
Wan2.2 loop (PusaV1/diffsynth/pipelines/wan22_video_pusa*.py) on the same random weights; frames of
multiplier 0 stay exactly as given; the 4-step mode merges a distill LoRA per expert; every task runs
in-process on both models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from pusa_model import media
from pusa_model.engine import LocalEngine, State
from pusa_model.errors import ConfigError, InvalidRequest
from pusa_model.loras import LoraRegistry
from pusa_model.operations import StepInput
from pusa_model.pipeline import PusaPipeline, load_dit_stage, model_folder
from pusa_model.presets import (WAN22_LORAS, build_tiny_distill_lora_state_dict, build_tiny_wan22_checkpoint,
                                get_preset)
from pusa_model.request import parse_request, plan_request, replan

WAN22 = get_preset("tiny-wan2.2")
PROMPT = "a cat walks on the grass"


@pytest.fixture(scope="module")
def wan22_folder():
    return model_folder(WAN22)


@pytest.fixture(scope="module")
def wan22_pipeline(wan22_folder):
    return PusaPipeline.from_preset("tiny-wan2.2", device="cpu")


def plan(preset=WAN22, loras=None, **fields):
    return plan_request(parse_request({"prompt": PROMPT, "seed": 5, **fields}), preset, loras=loras)


def boundary_experts(steps: int, boundary: float = 0.875) -> list[int]:
    """The expert of each step as the authors' loop picks it: the scheduler's float32 timesteps (shift 5)
    against ``boundary * 1000``; 0 is the high-noise expert."""
    raw = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    timesteps = 5.0 * raw / (1 + 4.0 * raw) * 1000
    return [0 if t.item() >= boundary * 1000 else 1 for t in timesteps]


class ForwardLog:
    """Which expert each DiT forward ran on: a hook on each expert's patch embedding (once a forward)."""

    def __init__(self, experts) -> None:
        self.calls: list[int] = []
        self._hooks = [stage.transformer.patch_embedding.register_forward_hook(
            lambda *_, e=e: self.calls.append(e)) for e, stage in enumerate(experts.stages)]

    def __enter__(self) -> ForwardLog:
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()


def denoise(experts, p, clean, text):
    """The plan's steps through the in-process engine (what `PusaPipeline.generate` runs)."""
    ops = p.operations
    state = State(text=text, clean=None if clean is None else clean.numpy())
    LocalEngine(dit=experts).run(p, state, ops[ops.denoising])
    return torch.from_numpy(state.latents)


def random_text(seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 512, 32, generator=g).numpy() for _ in range(2))


# --- the plan: which expert, which guidance, which alphas --------------------------------------------------

def test_requests_take_the_presets_per_expert_defaults_and_keep_their_own():
    p = plan()
    assert (p.request.lora_alpha, p.request.lora_alpha_2, p.request.guidance_2) == (1.5, 1.4, 5.0)
    assert p.lora_combination_of(0) == {"pusa": 1.5} and p.lora_combination_of(1) == {"pusa": 1.4}
    given = plan(lora_alpha=1.2, lora_alpha_2=0.9, guidance=3.0, guidance_2=2.0)
    assert given.lora_combination_of(0) == {"pusa": 1.2} and given.lora_combination_of(1) == {"pusa": 0.9}
    assert given.guidances == (3.0, 2.0)
    # a stored request (resolved when accepted) replans to the same thing
    again = replan(given.request.model_dump(), given.seed, "tiny-wan2.2")
    assert [vars(StepInput.of(again, k, None, None, None)) for k in range(10)] == \
        [vars(StepInput.of(given, k, None, None, None)) for k in range(10)]
    # Pusa V1 is as before: one expert, alpha 1.4, and no per-expert fields
    v1 = plan(get_preset("tiny"))
    assert v1.request.lora_alpha == 1.4 and v1.experts == 1
    assert {StepInput.of(v1, k, None, None, None).expert for k in range(10)} == {0}
    assert "expert" not in v1.describe()["steps"][0]


@pytest.mark.parametrize("field", ["guidance_2", "lora_alpha_2"])
def test_a_one_expert_model_refuses_the_per_expert_fields(field):
    with pytest.raises(InvalidRequest) as caught:
        plan(get_preset("tiny"), **{field: 2.0})
    assert caught.value.field == field


def test_the_step_input_names_its_expert_and_carries_that_experts_guidance():
    p = plan(steps=12, guidance=4.0, guidance_2=2.0)
    inputs = [StepInput.of(p, k, None, None, None) for k in range(12)]
    assert [i.expert for i in inputs] == boundary_experts(12) == [0] * 6 + [1] * 6  # t = 875.0 at step 5: high
    assert [i.guidance for i in inputs] == [4.0] * 6 + [2.0] * 6
    steps = p.describe()["steps"]
    assert [s["expert"] for s in steps] == boundary_experts(12) and steps[0]["guidance"] == 4.0


def test_the_fast_mode_takes_the_authors_four_timesteps_two_per_expert():
    p = plan(mode="fast")
    assert (p.request.steps, p.guidances) == (4, (1.0, 1.0)) and p.prompts[1] is None
    torch.testing.assert_close(p.sigmas[:-1] * 1000, torch.tensor([1000.0, 937.5, 833.3333, 625.0]))
    assert [p.expert(k) for k in range(4)] == [0, 0, 1, 1]


# --- the checkpoint and the DiT -----------------------------------------------------------------------------

def test_the_tiny_checkpoint_has_two_different_experts_in_the_wan22_layout(wan22_folder, tmp_path):
    index = json.loads((wan22_folder / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875 and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    weights = [load_file(wan22_folder / part / "diffusion_pytorch_model.safetensors")
               for part in ("transformer", "transformer_2")]
    assert weights[0].keys() == weights[1].keys()
    assert not torch.equal(weights[0]["blocks.0.attn1.to_q.weight"], weights[1]["blocks.0.attn1.to_q.weight"])
    loras = [load_file(wan22_folder / name) for name in WAN22_LORAS]
    key = "blocks.0.self_attn.q.lora_B.default.weight"
    assert not torch.equal(loras[0][key], loras[1][key])
    build_tiny_wan22_checkpoint(tmp_path / "again")  # deterministic
    for name in ("transformer_2/diffusion_pytorch_model.safetensors", *WAN22_LORAS):
        assert (tmp_path / "again" / name).read_bytes() == (wan22_folder / name).read_bytes()


def test_registry_loras_need_a_file_per_expert(wan22_folder, tmp_path):
    one_file = LoraRegistry.model_validate({"style": {"path": str(wan22_folder / WAN22_LORAS[0])}})
    with pytest.raises(ConfigError, match="a file per expert"):
        load_dit_stage(wan22_folder, WAN22, "cpu", loras=one_file)
    two_files = LoraRegistry.model_validate({"style": {"path": "a.safetensors", "path_2": "b.safetensors"}})
    with pytest.raises(ConfigError, match="one-expert model one file"):
        load_dit_stage(model_folder(get_preset("tiny")), get_preset("tiny"), "cpu", loras=two_files)


@pytest.mark.parametrize(("steps", "guidance", "guidance_2"), [(4, 5.0, 5.0), (10, 1.0, 3.0), (12, 2.0, 1.0)])
def test_each_step_runs_on_the_expert_of_its_timestep(wan22_pipeline, steps, guidance, guidance_2):
    # i2v at multiplier 0.2: the conditioning frame's own timestep (0.2 t) is below the boundary at every
    # step, yet the step's expert follows the step's timestep t
    p = plan(task="i2v", images=["unused.png"], steps=steps, guidance=guidance, guidance_2=guidance_2,
             width=32, height=32, frames=9)
    clean = torch.zeros(p.latent_shape)
    clean[:, :, 0] = torch.randn(clean[:, :, 0].shape)
    with ForwardLog(wan22_pipeline.dit) as log:
        denoise(wan22_pipeline.dit, p, clean, random_text(1))
    passes = {0: 1 if guidance == 1.0 else 2, 1: 1 if guidance_2 == 1.0 else 2}
    assert log.calls == [e for e in boundary_experts(steps) for _ in range(passes[e])]
    assert [s.lora.combination for s in wan22_pipeline.dit.stages] == [{"pusa": 1.5}, {"pusa": 1.4}]
    last = StepInput.of(p, steps - 1, np.zeros(p.latent_shape, np.float32), None, random_text(1))
    with pytest.raises(ValueError, match="expert 1 sent to the DiT of expert 0"):
        wan22_pipeline.dit.stage(0).run(last)  # one expert's stage refuses the other's step


# --- against the authors' loop ------------------------------------------------------------------------------

_WAN_TO_DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                     "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                     "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                     "ffn.2": "ffn.net.2"}
_LORA_KEY = re.compile(r"^(?:diffusion_model\.)?blocks\.(\d+)\.(.+)\.(lora_A\.default|lora_B\.default|lora_down|"
                       r"lora_up)\.weight$")


@torch.no_grad()
def merge_lora(transformer: WanTransformer3DModel, path, alpha: float) -> None:
    """The authors' merge (model_manager_wan22: load_loras_wan22, _load_and_merge_lora_weight_from_safetensors):
    ``W += alpha * (file alpha / rank) * up @ down`` (file alpha / rank is 1 where the file has no alpha)."""
    raw = load_file(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        m = _LORA_KEY.match(key)
        if m is not None:
            kind = "down" if m[3] in ("lora_A.default", "lora_down") else "up"
            pairs.setdefault(f"blocks.{m[1]}.{m[2]}", {})[kind] = value.float()
    assert pairs
    for wan, ab in pairs.items():
        file_alpha = raw.get(f"diffusion_model.{wan}.alpha")
        scale = 1.0 if file_alpha is None else float(file_alpha) / ab["down"].shape[0]
        _, i, rest = wan.split(".", 2)
        linear = transformer.get_submodule(f"blocks.{i}.{_WAN_TO_DIFFUSERS[rest]}")
        linear.weight += alpha * scale * (ab["up"] @ ab["down"])


@torch.no_grad()
def authors_loop(high, low, clean, multipliers, text, negative, steps, guidances, seed, boundary=0.875):
    """The Pusa authors' two-DiT loop (wan22_video_pusa_multi_frames.py with FlowMatchSchedulerPusaV2V,
    shift 5, extra_one_step), written with plain diffusers modules and per-token timesteps."""
    raw = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    sigmas = 5.0 * raw / (1 + 4.0 * raw)
    timesteps = sigmas * 1000
    noise = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latents = noise.clone()
    m = torch.tensor(multipliers)
    for f, mult in enumerate(multipliers):
        if mult < 1.0:  # a conditioning frame: (1 - m) z + m eps
            latents[:, :, f] = (1 - mult) * clean[:, :, f] + mult * noise[:, :, f]
    tokens = (clean.shape[3] // 2) * (clean.shape[4] // 2)
    for k, t in enumerate(timesteps):
        dit, guidance = (high, guidances[0]) if t.item() >= boundary * 1000 else (low, guidances[1])
        per_token = (t * m).repeat_interleave(tokens).unsqueeze(0)  # each frame's m * t on its tokens
        velocity = dit(latents, timestep=per_token, encoder_hidden_states=text, return_dict=False)[0]
        if guidance != 1.0:
            uncond = dit(latents, timestep=per_token, encoder_hidden_states=negative, return_dict=False)[0]
            velocity = uncond + guidance * (velocity - uncond)
        sigma_next = sigmas[k + 1] if k + 1 < steps else torch.tensor(0.0)
        latents = latents + velocity * (m * (sigma_next - sigmas[k])).view(1, 1, -1, 1, 1)
    return latents


def write_distill_loras(folder, tmp_path) -> LoraRegistry:
    """Stand-ins for Wan2.2-Lightning's 4-step LoRA pair (lora_down / lora_up / alpha, one file per expert)."""
    paths = []
    for e, part in enumerate(("transformer", "transformer_2")):
        transformer = WanTransformer3DModel.from_pretrained(folder / part)
        state = build_tiny_distill_lora_state_dict(transformer, seed=30 + e, norms=False)
        path = tmp_path / f"lightning_{e}.safetensors"
        save_file({k: v for k, v in state.items() if not k.endswith("diff_b")}, str(path))
        paths.append(str(path))
    return LoraRegistry.model_validate({"lightning": {"path": paths[0], "path_2": paths[1], "alpha": 1.0,
                                                      "fast": True}})


@pytest.mark.parametrize("mode", ["standard", "fast"])
def test_the_two_expert_sampler_equals_the_authors_loop(wan22_folder, tmp_path, mode):
    registry = write_distill_loras(wan22_folder, tmp_path) if mode == "fast" else None
    fields = dict(steps=12, guidance=4.0, guidance_2=2.0) if mode == "standard" else dict(mode="fast")
    p = plan(loras=registry, task="multi_frame", images=["a.png", "b.png"], positions=[0, 3],
             multipliers=[0.0, 0.4], width=32, height=32, frames=17, **fields)
    clean = torch.zeros(p.latent_shape)
    clean[:, :, [0, 3]] = torch.randn(clean[:, :, [0, 3]].shape, generator=torch.Generator().manual_seed(2))
    text, negative = random_text(3)
    experts = load_dit_stage(wan22_folder, WAN22, "cpu", loras=registry)
    with ForwardLog(experts) as log:
        ours = denoise(experts, p, clean, (text, negative))

    reference = []
    for e, part in enumerate(("transformer", "transformer_2")):
        dit = WanTransformer3DModel.from_pretrained(wan22_folder / part).eval()
        if registry is not None:  # the distill LoRA first, then the Pusa LoRA (the authors' --lightx2v)
            merge_lora(dit, registry.get("lightning").path_2 if e else registry.get("lightning").path, 1.0)
        merge_lora(dit, wan22_folder / WAN22_LORAS[e], (1.5, 1.4)[e])
        reference.append(dit)
    theirs = authors_loop(*reference, clean, p.multipliers.tolist(), torch.from_numpy(text),
                          torch.from_numpy(negative), p.request.steps, p.guidances, p.seed)

    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.abs().mean() > 0.1
    assert set(log.calls) == {0, 1} and len(log.calls) == (24 if mode == "standard" else 4)
    assert torch.equal(ours[:, :, 0], clean[:, :, 0])  # multiplier 0: kept exactly, through both experts
    if mode == "fast":
        assert [s.lora.combination for s in experts.stages] == [{"lightning": 1.0, "pusa": 1.5},
                                                                {"lightning": 1.0, "pusa": 1.4}]


def test_frozen_frames_stay_bit_identical_through_both_experts(wan22_pipeline):
    p = plan(task="v2v", video="unused.mp4", positions=[0, 1, 4], multipliers=[0.0, 0.0, 0.3], steps=6,
             width=32, height=32, frames=17)
    clean = torch.zeros(p.latent_shape)
    clean[:, :, [0, 1, 4]] = torch.randn(clean[:, :, [0, 1, 4]].shape)
    with ForwardLog(wan22_pipeline.dit) as log:
        out = denoise(wan22_pipeline.dit, p, clean, random_text(4))
    assert set(log.calls) == {0, 1}
    assert torch.equal(out[:, :, :2], clean[:, :, :2])
    assert not torch.equal(out[:, :, 4], clean[:, :, 4])


# --- every task in-process, on both models ------------------------------------------------------------------

TASKS = {
    "t2v": dict(task="t2v"),
    "i2v": dict(task="i2v", images=["{image}"]),
    "keyframes": dict(task="multi_frame", images=["{image}", "{image}"]),
    "v2v_completion": dict(task="v2v", video="{video}"),
    "v2v_extension": dict(task="v2v", video="{video}", v2v_mode="extension", video_anchor="end"),
    "long_video": dict(task="i2v", images=["{image}"], frames=25, window_frames=17),
}


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    pixels = np.random.default_rng(0).integers(0, 256, (17, 32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels[0]).save(folder / "image.png")
    media.write_mp4(pixels, folder / "video.mp4", 25)
    return {"image": str(folder / "image.png"), "video": str(folder / "video.mp4")}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", ["tiny", "tiny-wan2.2"])
def test_every_task_makes_its_video_in_process(request, preset, task, media_files, tmp_path):
    pipe = request.getfixturevalue("tiny_pipeline" if preset == "tiny" else "wan22_pipeline")
    fields = {k: ([v.format(**media_files) for v in value] if isinstance(value, list) else
                  value.format(**media_files) if isinstance(value, str) else value)
              for k, value in TASKS[task].items()}
    p = plan(get_preset(preset), steps=2, width=32, height=32, frames=fields.pop("frames", 17), **fields)
    experts = getattr(pipe.dit, "stages", None)
    log = ForwardLog(pipe.dit) if experts else None
    result = pipe.generate(p, tmp_path / "video.mp4")
    assert media.probe_video(result.video_path)["frames"] == p.frames
    if log is not None:
        log.__exit__()
        per_window = [e for e in boundary_experts(2) for _ in range(2)]  # guidance 5 on both: two passes
        assert log.calls == per_window * len(p.windows) == [0, 0, 1, 1] * len(p.windows)


def test_the_request_benchmark_runs_each_expert_in_its_steps(tmp_path):
    """`bench/request.py --model pusa-wan2.2`, the GPU benchmark of a whole request, here with `--tiny`: its
    warm-up compiles both experts (one step each) and the fast request runs two steps on each."""
    script = Path(__file__).resolve().parents[1] / "bench" / "request.py"
    out = tmp_path / "request.json"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--model", "pusa-wan2.2", "--variants", "fast",
                           "--decode-runs", "0", "--pusa-rank", "8", "--distill-rank", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"]["fast/warmup"]["forwards_by_expert"] == {"0": 1, "1": 1}
    timed = report["requests"]["fast/timed0"]
    assert timed["forwards_by_expert"] == {"0": 2, "1": 2} and len(timed["step_s"]) == 4
    assert timed["video_bytes"] > 0 and report["variants"]["fast"]["loras"] == ["pusa", "distill"]
