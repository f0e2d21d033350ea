"""Serve routes DiT steps by LoRA combination (the multiplexed model id), so that two jobs with different
combinations interleaved step by step over two DiT replicas are fused once per replica, not once per step;
and the Router resolves a request's ``loras`` and ``mode: fast`` against the app's registry (400 naming
the field for an unknown LoRA).

The DiT deployment alone runs on a local Ray (two replicas of the tiny preset with the Pusa LoRA and a
random LightX2V-form "distill" LoRA in the registry), called as the runner calls it (`Stages.step`'s
handle options); the replicas' stats count the fuses. A replica that loads a combination tells the
controller within 0.1 s and the routers learn it from there: until then (the first step of each job) a
request goes to the replica with the fewest combinations. A tiny step takes ~20 ms, a real one seconds, so
the test waits a second after the first steps, as a real step would. Each job's latents are checked against
the in-process stage fused with the same combination.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from ray import serve
from safetensors.torch import save_file

from deployments.dit import DiT
from deployments.openai_api import ApiError
from deployments.router import Router
from pusa_jobs.api_keys import Caller
from pusa_jobs.quotas import Quotas
from pusa_jobs.submission import Submission
from pusa_model.loras import LoraRegistry, combination_id
from pusa_model.operations import StepInput
from pusa_model.pipeline import load_dit_stage
from pusa_model.presets import build_tiny_distill_lora_state_dict, get_preset
from pusa_model.request import parse_request, plan_request
from serving import local_ray

APP = "lora-routing"


@pytest.fixture(scope="module")
def registry(tiny_folder, tmp_path_factory) -> dict:
    transformer = WanTransformer3DModel.from_pretrained(tiny_folder / "transformer")
    path = tmp_path_factory.mktemp("distill") / "distill.safetensors"
    save_file(build_tiny_distill_lora_state_dict(transformer), str(path))
    return {"distill": {"path": str(path), "alpha": 1.0, "fast": True}}


@pytest.fixture(scope="module")
def dit(registry):
    local_ray()
    try:
        app = DiT.options(num_replicas=2, max_ongoing_requests=1, ray_actor_options={"num_cpus": 0}).bind(
            preset="tiny", loras=registry, lora_base="cpu")
        serve.run(app, name=APP, route_prefix=None)
        yield serve.get_deployment_handle("DiT", app_name=APP)
    finally:
        serve.shutdown()


def replica_stats(handle) -> dict[int, dict]:
    """`stats()` of both replicas, by pid (concurrent calls spread: each replica takes one at a time)."""
    stats: dict[int, dict] = {}
    for _ in range(20):
        for response in [handle.stats.remote() for _ in range(4)]:
            s = response.result(timeout_s=60)
            stats[s["pid"]] = s
        if len(stats) == 2:
            return stats
    raise AssertionError(f"reached {len(stats)} of 2 DiT replicas")


def test_two_combinations_interleaved_fuse_once_per_replica(dit, registry, tiny_folder):
    preset, loras = get_preset("tiny"), LoraRegistry.model_validate(registry)
    plans = [plan_request(parse_request({"prompt": "p", "seed": 3, "steps": 6, "guidance": 1.0}), preset, loras=loras),
             plan_request(parse_request({"prompt": "p", "seed": 4, "mode": "fast", "steps": 6}), preset, loras=loras)]
    combos = [p.lora_combination for p in plans]
    assert combos == [{"pusa": 1.4}, {"pusa": 1.4, "distill": 1.0}]
    rng = np.random.default_rng(0)
    text = (rng.standard_normal((1, 8, 32)).astype(np.float32), None)
    clean = np.zeros(plans[0].latent_shape, np.float32)
    schedule = [(p.sigmas.tolist(), p.multipliers.tolist()) for p in plans]

    def step_input(j: int, k: int, x: np.ndarray | None) -> StepInput:
        return StepInput(k, *map(tuple, schedule[j]), 1.0, "standard", plans[j].seed, clean.shape, x,
                         clean if k == 0 else None, text)

    latents: list = [None, None]
    fuses = []
    for k in range(6):  # both jobs' step k in flight together, as two runners' jobs would be
        responses = [
            dit.options(multiplexed_model_id=combination_id(combo)).step.remote(step_input(j, k, latents[j]), f"job-{j}")
            for j, combo in enumerate(combos)
        ]
        latents = [r.result(timeout_s=120) for r in responses]
        if k == 0:
            time.sleep(1.0)  # a real step's duration: the routers learn which replica holds which combination
        stats = replica_stats(dit)
        fuses.append(sum(s["fuses"] for s in stats.values()))

    print(f"fuses after each of 6 rounds of 2 interleaved steps: {fuses}; replicas {list(stats.values())}")
    assert sum(s["steps_run"] for s in stats.values()) == 12
    # One fuse per replica (measured: [2, 2, 2, 2, 2, 2]); if both first steps hit one replica, the second
    # replica fuses at the next step. After that no step re-fuses.
    assert fuses[0] >= 2 and fuses[-1] == fuses[1] <= 3, fuses
    assert {combination_id(s["loras"]) for s in stats.values()} == {combination_id(c) for c in combos}

    # every step ran with its own combination fused: the in-process stage gives the same latents
    stage = load_dit_stage(tiny_folder, preset, "cpu", loras=loras, lora_base="disk")
    for j, combo in enumerate(combos):
        stage.set_loras(combo)
        x = None
        with torch.no_grad():
            for k in range(6):
                x = stage.run(step_input(j, k, x))
        np.testing.assert_allclose(latents[j], x, rtol=1e-5, atol=1e-5)
    assert not np.allclose(latents[0], latents[1], atol=1e-3)


def test_router_resolves_loras_and_fast_mode_against_the_registry(dit, registry, tmp_path):
    """The Router's own admission path (`_accept`, as ``POST /v1/videos`` runs it), in this process."""
    router_class = next(c for c in Router.func_or_class.__mro__[1:] if c.__name__ == "Router")  # under @ingress
    router = router_class(runner=None, preset="tiny", store=str(tmp_path / "store"),
                          database=f"sqlite:///{tmp_path / 'jobs.db'}", api={"auth": "keys"}, loras=registry)
    caller = Caller(key_id="key_1", role="user", quotas=Quotas())

    async def accept(**fields):
        sub = Submission()
        sub.fields = {name: [value] for name, value in fields.items()}
        return await router._accept(caller, sub, await router._generation_data(sub, caller), None)

    with pytest.raises(ApiError) as info:
        asyncio.run(accept(prompt="a cat", loras=[{"name": "anime", "alpha": 1.0}]))
    assert (info.value.status, info.value.param) == (400, "loras[0].name")
    assert "unknown LoRA 'anime' (this deployment has: distill)" in info.value.message

    job = asyncio.run(accept(prompt="a cat", mode="fast"))
    assert (job.request["steps"], job.request["guidance"], job.plan["steps"]) == (4, 1.0, 4)
    assert job.request["loras"] == [{"name": "distill", "alpha": 1.0}]  # stored resolved, as runners plan it
