"""A DiT replica over several GPUs of one node (`deployments/dit_group.py`), on the CPU.

The service runs on a local Ray with two logical GPUs: the DiT deployment has a placement group of two
one-GPU bundles (STRICT_PACK) and app arg ``dit_parallel``; its replica starts two worker actors, which
find no CUDA, join a gloo group and run the ``dit_warmup`` step together (again when the group is
rebuilt). First CFG parallel (``cfg: 2``): a job's MP4 is byte-identical to
the in-process pipeline's for the same plan, a DiT step equals the single-process step exactly, and a
worker killed mid-step costs one retried step (same video) and a rebuilt group in the same replica. Then
the same service is redeployed with Ulysses (``ulysses: 2``; the tiny model has 2 heads): a step equals
the single-process one within float tolerance, and so do a job's latents after its last step (its MP4 is
those latents' video, byte for byte; a lossy codec's pixels are not compared). Also the
2xA6000 profile (`serve_config.2gpu.yaml`) is checked the way `tests/test_configs.py` checks production.

References run in this process on one thread, as the replicas and workers do (under one CPU each):
CPU matmuls sum in another order with another thread count.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
import yaml
from ray import serve
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs
from deployments.dit import alpha_model_id
from deployments.dit_group import worker_resources
from deployments.launch import deploy, node_demands, unplaceable
from pusa_model.engine import LocalEngine, State, decode_video_files
from pusa_model.loras import combination_id
from pusa_model.operations import DecodeVideo, StepInput
from pusa_model.request import replan
from pusa_model.schedule import flow_sigmas
from service_probe import ServiceProbe, one_thread
from serving import default_database, local_config, running_service

try:
    from ray._common.utils import import_attr
except ImportError:  # older layout
    from ray._private.utils import import_attr

ROOT = Path(__file__).resolve().parent.parent
PROD, TWO_GPU = ROOT / "serve_config.yaml", ROOT / "serve_config.2gpu.yaml"
# As in serve_config.2gpu.yaml: the replica's CPU share lives in bundle 0; each worker gets half a CPU.
BUNDLES = {"placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"CPU": 0.5, "GPU": 1}],
           "placement_group_strategy": "STRICT_PACK", "ray_actor_options": {"num_cpus": 0.5}}
DEPLOYMENTS = {"DiT": {"autoscaling_config": None, "num_replicas": 1, "health_check_period_s": 1, **BUNDLES}}
RUNNER = {"poll_s": 0.2}
CFG2, ULYSSES2 = {"cfg": 2, "ulysses": 1}, {"cfg": 1, "ulysses": 2}
REQUEST = {"prompt": "a cat walks on the grass", "size": "64x64", "frames": 17, "guidance": 5.0, "seed": 7}
WARM_UP = {"width": 64, "height": 64, "frames": 17, "guidance": 5.0}  # REQUEST's shapes: each rank's warm-up step
SLOW, STEPS = {**REQUEST, "size": "1024x1024", "frames": 1}, 8


# -- the 2xA6000 profile (no Ray) -----------------------------------------------------------------


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dit(config: dict) -> dict:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == "DiT")


def _without_the_dit_changes(config: dict) -> dict:
    """`config` less what the 2-GPU profile may change: the DiT's resources and replica limit, the
    `dit_parallel` arg and the runner's job limit."""
    config = copy.deepcopy(config)
    (app,) = config["applications"]
    app["args"].pop("dit_parallel", None)
    app["args"]["runner"].pop("max_running_jobs")
    dit = _dit(config)
    for key in ("ray_actor_options", "placement_group_bundles", "placement_group_strategy"):
        dit.pop(key, None)
    dit["autoscaling_config"].pop("max_replicas")
    return config


def test_two_gpu_profile_is_production_with_a_two_card_dit():
    two, prod = _load(TWO_GPU), _load(PROD)
    config = ServeDeploySchema.model_validate(two)
    (app,) = config.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert {d.name for d in build_app(built, name=app.name).deployments} == {
        "Router", "Runner", "TextEncoder", "VAE", "DiT", "DiTHigh", "DiTLow"}
    assert _without_the_dit_changes(two) == _without_the_dit_changes(prod)

    layout = AppArgs.model_validate(app.args).dit_parallel
    assert (layout.cfg, layout.ulysses) == (2, 1)
    dit = _dit(two)
    assert dit["ray_actor_options"] == {"num_cpus": 1}  # the replica: no GPU, no A6000
    assert dit["placement_group_strategy"] == "STRICT_PACK"
    bundles = dit["placement_group_bundles"]
    assert len(bundles) == layout.size
    # every worker gets one card and a CPU: bundle 0 less the replica's share, the others whole
    for i, bundle in enumerate(bundles):
        opts = worker_resources(bundle, {"CPU": 1.0} if i == 0 else {})
        assert opts == {"num_cpus": 1, "num_gpus": 1, "resources": {"A6000": 1}}, (i, opts)
    # 8 two-card replicas: production's 16 cards; the runners can keep each one busy, and no more
    assert dit["autoscaling_config"]["max_replicas"] * 2 == _dit(prod)["autoscaling_config"]["max_replicas"]
    runners = next(d for d in app.deployments if d.name == "Runner").num_replicas
    assert runners * app.args["runner"]["max_running_jobs"] == dit["autoscaling_config"]["max_replicas"]


def test_two_gpu_dit_needs_one_node_with_both_cards():
    config = ServeDeploySchema.model_validate(_load(TWO_GPU))
    dit = next(d for d in config.applications[0].deployments if d.name == "DiT")
    assert node_demands(dit) == [{"CPU": 3.0, "GPU": 2.0, "A6000": 2.0}]
    head = {"CPU": 16.0}
    two_cards = {"CPU": 32.0, "GPU": 2.0, "A6000": 2.0}
    one_card = {"CPU": 32.0, "GPU": 1.0, "A6000": 1.0}
    assert unplaceable(config, [head, two_cards]) == []
    # two 1-card nodes have the cards, but not on one node
    (line,) = unplaceable(config, [head, one_card, one_card])
    assert line.startswith("pusa/DiT needs") and "one node" in line


# -- the service on two logical GPUs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def group_service(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("dit-group") / "store")
    args = {"dit_parallel": CFG2, "dit_warmup": [WARM_UP]}
    with running_service(store, runner=RUNNER, deployments=DEPLOYMENTS, args=args, num_gpus=2) as url:
        svc = ServiceProbe(url, default_database(store), {"DiT": 1, "Runner": 1})
        svc.store = store
        try:
            yield svc
        finally:
            svc.close()


def _dit_handle(alpha: float = 1.4):
    return serve.get_deployment_handle("DiT", app_name="pusa").options(multiplexed_model_id=alpha_model_id(alpha))


def _stats() -> dict:
    return serve.get_deployment_handle("DiT", app_name="pusa").stats.remote().result(timeout_s=60)


def _step_inputs(tiny_pipeline, height: int, width: int):
    """One mid-schedule step's arguments: random latents (two conditioning frames), real embeddings."""
    rng = np.random.default_rng(height * width)
    latents = rng.standard_normal((1, 16, 5, height, width)).astype(np.float32)
    prompt, negative = tiny_pipeline.text.encode("a cat walks on the grass", "blurred details")
    text = (prompt.numpy(), negative.numpy())
    return latents, flow_sigmas(6).tolist(), [0.3, 1.0, 1.0, 1.0, 0.0], text


def _compare_steps(tiny_pipeline, exact: bool) -> None:
    """DiT steps through the handle (the group) against `DiTStage.run` on the in-process stage."""
    handle = _dit_handle(1.4)
    tiny_pipeline.dit.set_lora_alpha(1.4)
    for height, width, guidance in [(6, 10, 5.0), (8, 8, 5.0), (6, 10, 1.0)]:  # 15 tokens a frame: uneven
        latents, sigmas, multipliers, text = _step_inputs(tiny_pipeline, height, width)
        inp = StepInput(2, tuple(sigmas), tuple(multipliers), guidance, "standard", 0, latents.shape, latents,
                        text=text)
        served = handle.step.remote(inp).result(timeout_s=120)
        with one_thread():  # as the workers run
            reference = tiny_pipeline.dit.run(inp)
        if exact:
            assert np.array_equal(served, reference), (height, width, guidance)
        else:
            np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-5)
            assert not np.array_equal(served, latents)


class _ServedDiT:
    """The DiT deployment as `LocalEngine`'s DiT stage: each step through the handle, on the replica (here
    its group) that holds the plan's LoRA combination, as the runner sends it (Pusa V1: one expert)."""

    def stage(self, expert: int) -> _ServedDiT:
        assert expert == 0
        return self

    def set_loras(self, combination: dict[str, float]) -> None:
        handle = serve.get_deployment_handle("DiT", app_name="pusa")
        self.handle = handle.options(multiplexed_model_id=combination_id(combination))

    def run(self, inp: StepInput) -> np.ndarray:
        return self.handle.step.remote(inp).result(timeout_s=120)


def test_cfg_parallel_job_is_byte_identical_to_the_pipeline(group_service, tiny_pipeline, tmp_path):
    svc = group_service
    t0 = time.monotonic()
    job_id, video = svc.run(timeout=120, **REQUEST, steps=4)
    print(f"cfg=2 job: {time.monotonic() - t0:.1f}s")
    assert video == svc.reference_video(tiny_pipeline, job_id, tmp_path)

    stats = _stats()
    workers = stats["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["device"] == "cpu" and w["lora_alpha"] == 1.4 for w in workers)  # the alpha went to both
    # each worker holds its bundle, less the replica's share of bundle 0
    assert all(w["resources"] == {"CPU": 0.5, "GPU": 1.0} for w in workers), workers
    assert len({w["pid"] for w in workers} | {stats["pid"]}) == 3  # the replica holds no model itself
    assert workers[0]["steps_run"] == workers[1]["steps_run"] == stats["steps_run"] >= 4
    assert all(w["warm_ups"] == [WARM_UP] for w in workers)  # both ranks ran the collective warm-up step
    _compare_steps(tiny_pipeline, exact=True)


def test_lost_worker_costs_one_step_and_the_group_is_rebuilt(group_service, tiny_pipeline, tmp_path):
    svc = group_service
    before = _stats()
    # 1024x1024, one frame: a pass takes ~0.3 s on a core, so the kill most likely lands mid-step, with
    # rank 0 inside a collective (gloo fails it; NCCL would hang it: the replica kills it either way)
    job_id = svc.submit(**SLOW, steps=STEPS)
    svc.wait_steps(job_id, 2)
    os.kill(before["workers"][1]["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    job = svc.wait_ended(job_id, timeout=150)
    print(f"job finished {time.monotonic() - t0:.1f}s after the kill")
    assert job.status == "completed", job.error

    events = svc.sse_events(job_id)
    retries = [e for e in events if e["type"] == "retry"]
    assert len(retries) == 1 and "ActorDiedError" in retries[0]["reason"], retries
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, STEPS + 1))  # none lost or redone
    assert svc.content(job_id) == svc.reference_video(tiny_pipeline, job_id, tmp_path)

    after = _stats()
    assert after["pid"] == before["pid"] and after["rebuilds"] == before["rebuilds"] + 1  # same replica
    old = {w["pid"] for w in before["workers"]}
    assert len(after["workers"]) == 2 and not old & {w["pid"] for w in after["workers"]}
    assert all(w["lora_alpha"] == 1.4 for w in after["workers"])  # the rebuilt group re-fused the alpha
    assert all(w["warm_ups"] == [WARM_UP] for w in after["workers"])  # and warmed up before its next step


def test_ulysses_group_after_a_redeploy(group_service, tiny_pipeline):
    svc = group_service
    config = local_config(svc.store, urlparse(svc.url).port, runner=RUNNER, deployments=DEPLOYMENTS,
                          args={"dit_parallel": ULYSSES2})
    t0 = time.monotonic()
    problems = deploy(ServeDeploySchema.model_validate(config), 180)
    assert not problems, problems
    while (stats := _stats()).get("parallel") != ULYSSES2:  # until the new replica has replaced the old
        assert time.monotonic() - t0 < 180, stats
        time.sleep(0.5)
    assert len(stats["workers"]) == 2, stats
    print(f"redeployed with ulysses 2 in {time.monotonic() - t0:.1f}s")
    _compare_steps(tiny_pipeline, exact=False)

    job_id, video = svc.run(timeout=120, **REQUEST, steps=4)
    job = svc.record(job_id)
    plan = replan(job.request, job.plan["seed"], "tiny")
    assert len(plan.windows) == 1 and isinstance(plan.operations[-1], DecodeVideo)
    denoise = list(plan.operations)[:-1]  # the text, then every step
    with one_thread():  # as the service's replicas and workers run
        served = LocalEngine(tiny_pipeline.text, dit=_ServedDiT()).run(plan, State(), denoise).latents
        reference = LocalEngine(tiny_pipeline.text, dit=tiny_pipeline.dit).run(plan, State(), denoise).latents
        # the job's video is its latents' video: these steps through the group make the job's latents
        assert video == decode_video_files(tiny_pipeline.vae, torch.from_numpy(served.copy()), plan.request.fps)[0]
    # Ulysses sums attention in another order, so the latents equal the pipeline's within float tolerance
    # (after 4 steps they were 2.9e-6 apart at most: the tolerance is 35 times that, and far below the
    # latents' own scale, about 1)
    print(f"ulysses latents vs pipeline: up to {np.abs(served - reference).max():.2e} apart")
    np.testing.assert_allclose(served, reference, rtol=1e-4, atol=1e-4)
