"""VTA sampling: equal to diffusers' WanPipeline for t2v, exact conditioning at m = 0 and m = 1,
and the schedule as the formulas give it."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

from pusa_model.dit import DiTStage
from pusa_model.presets import get_preset
from pusa_model.request import plan_request
from pusa_model.request_schema import GenerationRequest
from pusa_model.sampler import initial_latents, initial_noise
from pusa_model.schedule import flow_sigmas
from pusa_model.text import TextEncoderStage


@pytest.fixture(scope="module")
def parts(tiny_folder):
    return {
        "tokenizer": AutoTokenizer.from_pretrained(tiny_folder / "tokenizer"),
        "text_encoder": UMT5EncoderModel.from_pretrained(tiny_folder / "text_encoder").eval(),
        "vae": AutoencoderKLWan.from_pretrained(tiny_folder / "vae").eval(),
        "transformer": WanTransformer3DModel.from_pretrained(tiny_folder / "transformer").eval(),
    }


def run_vta(dit: DiTStage, plan, clean, prompt, negative):
    latents = initial_latents(initial_noise(plan.latent_shape, plan.seed), clean, plan.multipliers)
    for k in range(plan.request.steps):
        latents = dit.step(latents, k, plan.sigmas, plan.multipliers, prompt, negative, plan.request.guidance)
    return latents


def make_plan(**kw):
    kw.setdefault("prompt", "a cat walks on the grass")
    kw.setdefault("seed", 7)
    return plan_request(GenerationRequest(**kw), get_preset("tiny"))


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_t2v_equals_diffusers_wan_pipeline(parts, guidance):
    plan = make_plan(task="t2v", steps=4, guidance=guidance, frames=9, width=32, height=48)
    text = TextEncoderStage(parts["tokenizer"], parts["text_encoder"])
    prompt, negative = text.encode(plan.request.prompt, plan.request.negative_prompt if guidance > 1 else None)
    ours = run_vta(DiTStage(parts["transformer"]), plan, torch.zeros(plan.latent_shape), prompt, negative)

    # diffusers' own loop: flow-match Euler over Pusa's shifted sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    set_timesteps = scheduler.set_timesteps
    pusa_sigmas = plan.sigmas[:-1].numpy()
    scheduler.set_timesteps = lambda num_inference_steps=None, device=None, **kw: set_timesteps(
        sigmas=pusa_sigmas, device=device
    )
    pipe = WanPipeline(scheduler=scheduler, **parts)
    theirs = pipe(
        prompt_embeds=prompt,
        negative_prompt_embeds=negative if negative is not None else None,
        latents=initial_noise(plan.latent_shape, plan.seed),
        num_inference_steps=plan.request.steps,
        guidance_scale=guidance,
        height=plan.height,
        width=plan.width,
        num_frames=plan.frames,
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)
    assert ours.abs().mean() > 0.1  # a real trajectory, not a trivial zero


def test_m0_frame_is_frozen_bit_identical(parts):
    plan = make_plan(task="i2v", images=["unused.png"], multipliers=[0.0], steps=3, frames=9)
    clean = torch.zeros(plan.latent_shape)
    clean[:, :, 0] = torch.randn(plan.latent_shape[1:2] + plan.latent_shape[3:])
    prompt = torch.randn(1, 512, 32)
    out = run_vta(DiTStage(parts["transformer"]), plan, clean, prompt, torch.randn(1, 512, 32))
    assert torch.equal(out[:, :, 0], clean[:, :, 0])
    assert not torch.equal(out[:, :, 1], clean[:, :, 1])


def test_m1_is_the_same_as_no_conditioning(parts):
    prompt, negative = torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    dit = DiTStage(parts["transformer"])
    cond_plan = make_plan(task="i2v", images=["unused.png"], multipliers=[1.0], steps=3, frames=9)
    clean = torch.zeros(cond_plan.latent_shape)
    clean[:, :, 0] = 3.0
    conditioned = run_vta(dit, cond_plan, clean, prompt, negative)
    free = run_vta(dit, make_plan(task="t2v", steps=3, frames=9), torch.zeros(cond_plan.latent_shape), prompt, negative)
    assert torch.equal(conditioned, free)


def test_intermediate_multiplier_keeps_frame_near_condition(parts):
    prompt = torch.randn(1, 512, 32)
    dit = DiTStage(parts["transformer"])
    plans = {m: make_plan(task="i2v", images=["x.png"], multipliers=[m], steps=3, frames=9, guidance=1.0) for m in (0.1, 0.9)}
    clean = torch.zeros(plans[0.1].latent_shape)
    clean[:, :, 0] = torch.randn(clean[:, :, 0].shape)
    err = {m: (run_vta(dit, p, clean, prompt, None)[:, :, 0] - clean[:, :, 0]).abs().mean() for m, p in plans.items()}
    assert err[0.1] < err[0.9]


def test_i2v_schedule_matches_hand_computed_values():
    plan = make_plan(task="i2v", images=["x.png"], steps=10, frames=81)
    described = plan.describe()
    assert described["latent_frames"] == 21
    assert described["conditioning"][0]["latent_index"] == 0
    assert described["conditioning"][0]["multiplier"] == pytest.approx(0.2)
    for k, step in enumerate(described["steps"]):
        raw = 1 - k / 10
        sigma = 5 * raw / (1 + 4 * raw)
        raw_next = 1 - (k + 1) / 10
        sigma_next = 5 * raw_next / (1 + 4 * raw_next) if k < 9 else 0.0
        assert step["sigma"] == pytest.approx(sigma, abs=1e-5)
        assert step["sigma_next"] == pytest.approx(sigma_next, abs=1e-5)
        assert step["timesteps"][0] == pytest.approx(0.2 * 1000 * sigma, abs=1e-3)
        assert step["timesteps"][1:] == pytest.approx([1000 * sigma] * 20, abs=1e-3)
        assert step["frame_sigma_deltas"][0] == pytest.approx(0.2 * (sigma_next - sigma), abs=1e-5)
        assert step["frame_sigma_deltas"][5] == pytest.approx(sigma_next - sigma, abs=1e-5)
    # First step at t = 1000 (pure noise), last step lands on sigma = 0.
    assert described["steps"][0]["timesteps"][:2] == pytest.approx([200.0, 1000.0])
    assert described["steps"][-1]["sigma_next"] == 0.0
    assert math.isclose(described["steps"][1]["sigma"], 4.5 / 4.6, rel_tol=1e-6)


def test_flow_sigmas_shape_and_ends():
    sigmas = flow_sigmas(10)
    assert sigmas.shape == (11,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])


def test_noise_is_reproducible_from_seed():
    a, b, c = initial_noise((1, 16, 3, 4, 4), 11), initial_noise((1, 16, 3, 4, 4), 11), initial_noise((1, 16, 3, 4, 4), 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("guidance,passes", [(1.0, 1), (4.0, 2)])
def test_unconditional_pass_skipped_at_guidance_one(parts, guidance, passes):
    calls = []
    dit = DiTStage(parts["transformer"])
    forward = dit.velocity
    dit.velocity = lambda *a: calls.append(1) or forward(*a)
    plan = make_plan(task="t2v", steps=2, frames=5, guidance=guidance)
    run_vta(dit, plan, torch.zeros(plan.latent_shape), torch.randn(1, 512, 32), torch.randn(1, 512, 32))
    assert len(calls) == passes * 2


def test_bfloat16_dit_steps_in_its_own_dtype(tiny_folder):
    """diffusers keeps some DiT parameters in float32; the stage must still feed bf16 inputs."""
    transformer = WanTransformer3DModel.from_pretrained(tiny_folder / "transformer", torch_dtype=torch.bfloat16)
    assert next(transformer.parameters()).dtype == torch.float32  # scale_shift_table comes first
    dit = DiTStage(transformer.eval())
    assert dit.dtype == torch.bfloat16
    plan = make_plan(task="t2v", steps=2, frames=5)
    out = run_vta(dit, plan, torch.zeros(plan.latent_shape), torch.randn(1, 512, 32), torch.randn(1, 512, 32))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, initial_noise(plan.latent_shape, plan.seed))
