"""Multi-GPU DiT on the CPU: Ulysses sequence parallelism and CFG parallelism on gloo ranks equal the
single-process per-frame forward and denoising step.

Each test spawns its ranks (gloo over a file:// rendezvous); every rank also computes the single-process
reference itself, on the same tiny model and inputs, and asserts. The tiny model has 2 heads; 5 latent
frames of 6x10 latents give 15 tokens per frame, so 2 ranks hold 8 and 7 of each frame (uneven shares).
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel

from pusa_model.dit import DiTStage
from pusa_model.parallel import (
    ParallelDiTStage,
    SequenceParallel,
    UlyssesTokens,
    cfg_parallel_velocity,
    frame_token_shares,
    init_parallel_groups,
)
from pusa_model.presets import tiny_transformer_config
from pusa_model.sampler import denoise_step
from pusa_model.schedule import flow_sigmas
from pusa_model.transformer import forward_per_frame

FRAMES = 5
MULTIPLIERS = torch.tensor([0.2, 1.0, 1.0, 1.0, 0.5])  # two conditioning frames: per-frame timesteps differ


def _model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny_transformer_config()).eval()


def _inputs(height: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, FRAMES, height, width, generator=gen)
    prompt = torch.randn(1, 12, 32, generator=gen)
    negative = torch.randn(1, 12, 32, generator=gen)
    tau = torch.rand(1, FRAMES, generator=gen) * 1000
    return latents, tau, prompt, negative


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )


def _step_args(latents, prompt, negative, guidance):
    return dict(
        latents=latents,
        step=1,
        sigmas=flow_sigmas(4),
        multipliers=MULTIPLIERS,
        prompt_embeds=prompt,
        negative_embeds=negative,
        guidance=guidance,
    )


def _two_ranks(rank: int, world: int, init_file: str) -> None:
    _init(rank, world, init_file)
    model = _model()
    with torch.no_grad():
        # (a) Ulysses over 2 ranks == the single-process per-frame forward, uneven (15) and even (16) shares.
        groups = init_parallel_groups(cfg=1, ulysses=2, device_type="cpu")
        sp = SequenceParallel(model, groups)
        for height, width in [(6, 10), (8, 8)]:
            x, tau, prompt, _ = _inputs(height, width)
            reference = forward_per_frame(model, x, tau, prompt)
            parallel = sp(x, tau, prompt)
            torch.testing.assert_close(parallel, reference, rtol=1e-5, atol=1e-5)
            # The all-to-all matters: the same token split without it (each rank attending to its own
            # tokens only) is wrong, and the attention processors are left as they were.
            tokens = UlyssesTokens(groups.ulysses_group, (height // 2) * (width // 2))
            local_only = forward_per_frame(model, x, tau, prompt, tokens=tokens)
            assert (local_only - reference).abs().max() > 1e-3
            assert all(block.attn1.processor._parallel_config is None for block in model.blocks)

        # (b) CFG over 2 ranks: the two passes on different ranks == the single-process step (bit-exact:
        # each rank runs the same forward as the reference, and the combination is the same arithmetic).
        groups = init_parallel_groups(cfg=2, ulysses=1, device_type="cpu")
        x, _, prompt, negative = _inputs(6, 10, seed=2)
        velocity = DiTStage(model).velocity
        for guidance in (5.0, 1.0):
            args = _step_args(x, prompt, negative, guidance)
            reference = denoise_step(velocity, **args)
            guide = functools.partial(cfg_parallel_velocity, cfg_group=groups.cfg_group)
            parallel = denoise_step(velocity, **args, guide=guide)
            assert torch.equal(parallel, reference)
        parallel = ParallelDiTStage(model, groups).step(**_step_args(x, prompt, negative, 5.0))
        assert torch.equal(parallel, DiTStage(model).step(**_step_args(x, prompt, negative, 5.0)))
    dist.destroy_process_group()


def _four_ranks(rank: int, world: int, init_file: str) -> None:
    # (c) CFG x Ulysses = 2 x 2: ranks 0,1 split the conditional pass, ranks 2,3 the unconditional one.
    _init(rank, world, init_file)
    model = _model()
    groups = init_parallel_groups(cfg=2, ulysses=2, device_type="cpu")
    stage = ParallelDiTStage(model, groups)
    x, _, prompt, negative = _inputs(6, 10, seed=3)
    for guidance in (5.0, 1.0):  # at 1.0 both rows run the conditional pass
        parallel = stage.step(**_step_args(x, prompt, negative, guidance))
        reference = DiTStage(model).step(**_step_args(x, prompt, negative, guidance))
        torch.testing.assert_close(parallel, reference, rtol=1e-5, atol=1e-5)
        # Every rank holds the same latents, so any of them can answer the step.
        everyone = [torch.empty_like(parallel) for _ in range(world)]
        dist.all_gather(everyone, parallel)
        assert all(torch.equal(other, parallel) for other in everyone)
    dist.destroy_process_group()


def _spawn(fn, world: int, tmp_path) -> None:
    """Run `fn` on `world` ranks, forked from a forkserver that has imported torch and diffusers once
    (instead of about 5 s of CPU per spawned rank) and has run no torch op (no thread pools to fork).
    (Python 3.11's forkserver ignores sys.path when preloading, so this test module itself is not.)"""
    multiprocessing.set_forkserver_preload(["pusa_model.parallel", "pytest"])
    mp.start_processes(
        fn, args=(world, str(tmp_path / "rendezvous")), nprocs=world, join=True, start_method="forkserver"
    )


def test_frame_token_shares():
    assert frame_token_shares(15, 2) == [8, 7]
    assert frame_token_shares(1560, 8) == [195] * 8  # 480p: 30x52 tokens a frame
    assert frame_token_shares(10, 4) == [3, 3, 2, 2]
    with pytest.raises(ValueError):
        frame_token_shares(3, 4)


def test_ulysses_and_cfg_parallel_on_two_ranks(tmp_path):
    _spawn(_two_ranks, 2, tmp_path)


def test_cfg_times_ulysses_on_four_ranks(tmp_path):
    _spawn(_four_ranks, 4, tmp_path)
