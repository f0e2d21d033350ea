"""A long video's life in the runner, in one process: `JobRun` drives the service's own TextEncoder, VAE and
DiT classes (called in process, as their handles would call them), a SQLite job database and a folder
store. Faults are injected where a replica's call would fail, and a drain is raised at a chosen step, so
what happens at each window boundary is deterministic: a window whose stages gave up runs again from its
start without redoing the window before it; a job released at any step (a window's last one too) is
resumed by the next runner to the same video; a cancel lands between windows.

The live service runs the same code under Serve in tests/test_faults.py (a DiT replica killed in window 2).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

from deployments.dit import DiT
from deployments.job_run import JobRun, RunContext
from deployments.runner import RunnerSettings
from deployments.stages import Stages, StageSettings
from deployments.text_encoder import TextEncoder
from deployments.vae import VAE
from pusa_jobs.db import open_database
from pusa_jobs.job_files import JobFiles
from pusa_jobs.job_store import JobStore
from pusa_jobs.jobs import Job, job_created_at, job_plan, new_job_id
from pusa_jobs.storage import StoreUnavailable, open_store
from pusa_model.loras import parse_combination_id
from pusa_model.presets import get_preset
from pusa_model.request import parse_request, plan_request
from serving import local_ray

STEPS = 3
REQUEST = {"prompt": "a long walk", "frames": 25, "window_frames": 17, "steps": STEPS, "seed": 5}  # 3 windows


class LocalResponse:
    """What `handle.method.remote()` returns: awaitable, cancellable."""

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.future.cancel()


class LocalHandle:
    """A deployment handle over an in-process replica: ObjectRef arguments resolved as Serve resolves them,
    the multiplexed LoRA combination fused before a DiT call, `before(method, args)` run first (to fail a call
    or to act at a step)."""

    def __init__(self, replica, before=None, model_id: str = "") -> None:
        self.replica, self.before, self.model_id = replica, before, model_id

    def options(self, multiplexed_model_id: str = "", **_) -> LocalHandle:
        return LocalHandle(self.replica, self.before, multiplexed_model_id)

    def __getattr__(self, name: str):
        handle = self

        class Method:
            @staticmethod
            def remote(*args, **kwargs) -> LocalResponse:
                args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
                return LocalResponse(asyncio.ensure_future(handle._call(name, args, kwargs)))

        return Method()

    async def _call(self, name: str, args: tuple, kwargs: dict):
        if self.before is not None:
            self.before(name, args)
        if self.model_id:
            await asyncio.to_thread(self.replica._set_loras, parse_combination_id(self.model_id))
        return await getattr(self.replica, name)(*args, **kwargs)


@pytest.fixture(scope="module")
def replicas(tiny_folder):
    local_ray()
    yield TextEncoder.func_or_class(), DiT.func_or_class()


class Runner:
    """One runner's context over a fresh database and store; `dit_before` and `vae_before` hook every DiT and
    VAE call."""

    def __init__(self, folder: Path, replicas) -> None:
        self.jobs = JobStore(open_database(f"sqlite:///{folder}/jobs.db"), lease_ttl_s=60)
        self.files = JobFiles(open_store(str(folder / "store")))
        self.dit_before = self.vae_before = None
        text, dit = replicas
        vae = VAE.func_or_class(store=str(folder / "store"))
        stages = Stages(LocalHandle(text),
                        LocalHandle(vae, lambda name, args: self.vae_before and self.vae_before(name, args)),
                        LocalHandle(dit, lambda name, args: self.dit_before and self.dit_before(name, args)),
                        StageSettings(retries=1, backoff_s=0.01))
        self.ctx = RunContext(jobs=self.jobs, files=self.files, stages=stages, settings=RunnerSettings(),
                              preset="tiny", retention_s=3600, webhook_url=None, draining=asyncio.Event())

    def submit(self, request: dict) -> str:
        plan = plan_request(parse_request(request), get_preset("tiny"))
        job_id = new_job_id(time.time())
        self.jobs.create(Job(id=job_id, created_at=job_created_at(job_id), request=plan.request.model_dump(),
                             plan=job_plan(plan)), {"type": "queued"})
        return job_id

    def run(self) -> None:
        """Claim the next job and run it until it ends or is released."""
        self.ctx.draining.clear()
        asyncio.run(JobRun(self.ctx, self.jobs.claim("runner")).run())

    def steps(self, job_id: str) -> list[tuple[int, int]]:
        return [(e["segment"], e["step"]) for e in self.jobs.events_after(job_id, -1) if e["type"] == "step"]

    def video(self, job_id: str) -> bytes:
        return self.files.store.get(self.files.result_key(job_id, "video"))


@pytest.fixture(scope="module")
def reference(tiny_pipeline, tmp_path_factory) -> bytes:
    """The video of REQUEST made by the in-process pipeline (this process: the same thread count)."""
    plan = plan_request(parse_request(REQUEST), get_preset("tiny"))
    return tiny_pipeline.generate(plan, tmp_path_factory.mktemp("ref") / "long.mp4").video_path.read_bytes()


def test_a_window_whose_stages_give_up_runs_again_from_its_start(replicas, reference, tmp_path):
    runner = Runner(tmp_path, replicas)
    failures = []

    def fail_in_second_window(name: str, args: tuple) -> None:
        if name == "step" and args[0].seed == REQUEST["seed"] + 1 and len(failures) < 2:  # window 1's seed
            failures.append(args[0].step)
            raise StoreUnavailable("injected")  # a retryable failure: retried once, then the stage gives up

    runner.dit_before = fail_in_second_window
    job_id = runner.submit(REQUEST)
    runner.run()

    job, events = runner.jobs.get(job_id), runner.jobs.events_after(job_id, -1)
    assert job.status == "completed", job.error
    assert failures == [0, 0]  # window 1's first step, twice: the call and its one retry
    window_retry = [e for e in events if e["type"] == "retry" and e["stage"] == "window"]
    assert len(window_retry) == 1 and window_retry[0]["step"] == STEPS
    # window 0 ran once; window 1 ran (again) from its start after the retry; nothing else twice
    assert runner.steps(job_id) == [(w, w * STEPS + k) for w in range(3) for k in range(1, STEPS + 1)]
    assert [e["segment"] for e in events if e["type"] == "segment"] == [0, 1, 2]
    assert runner.video(job_id) == reference


@pytest.mark.parametrize("drain_at", [STEPS, STEPS + 2], ids=["a-window-s-last-step", "mid-window"])
def test_a_released_long_video_resumes_to_the_same_video(replicas, reference, tmp_path, drain_at):
    runner = Runner(tmp_path, replicas)
    calls = []

    def drain(name: str, args: tuple) -> None:
        if name == "step":
            calls.append(args[0].step)
            if len(calls) == drain_at:  # the step in flight ends, then the job is released
                runner.ctx.draining.set()

    runner.dit_before = drain
    job_id = runner.submit(REQUEST)
    runner.run()
    released = runner.jobs.get(job_id)
    assert (released.lease_holder, released.checkpoint_step) == (None, drain_at)
    runner.dit_before = None
    runner.run()  # the next holder

    job, events = runner.jobs.get(job_id), runner.jobs.events_after(job_id, -1)
    assert job.status == "completed", job.error
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 3 * STEPS + 1))  # each step once
    assert [e["segment"] for e in events if e["type"] == "segment"] == [0, 1, 2]  # each window decoded once
    assert runner.video(job_id) == reference


def test_a_cancel_lands_between_windows(replicas, tmp_path):
    runner = Runner(tmp_path, replicas)
    job_id = runner.submit(REQUEST)

    def cancel_while_the_first_window_decodes(name: str, args: tuple) -> None:
        if name == "decode_window_to_store" and args[1] == 0:
            runner.jobs.request_cancel(job_id)

    runner.vae_before = cancel_while_the_first_window_decodes
    runner.run()
    job, events = runner.jobs.get(job_id), runner.jobs.events_after(job_id, -1)
    assert job.status == "cancelled"
    assert events[-1] == {**events[-1], "type": "cancelled", "step": STEPS}
    assert runner.steps(job_id) == [(0, k) for k in range(1, STEPS + 1)]  # nothing of window 1 ran


def test_a_fast_job_steps_with_the_fast_attention_kernel(replicas, tmp_path):
    text, _ = replicas
    dit = DiT.func_or_class(options={"fast_attention": "_native_math"})  # dit_options of the app
    runner = Runner(tmp_path, (text, dit))
    kernels = []  # the kernel each DiT step finds the model on (the step before left it so)
    runner.dit_before = lambda name, args: name == "step" and kernels.append(dit.stage.attention)
    for mode in ("fast", "standard"):
        job_id = runner.submit({"prompt": "a cat", "frames": 9, "mode": mode, "seed": 2})
        runner.run()
        assert runner.jobs.get(job_id).status == "completed"
        assert dit.stage.attention == {"fast": "_native_math", "standard": "native"}[mode]
    # 4 fast steps (the first finds the default), then 10 standard ones (the first finds the fast kernel)
    assert kernels == ["native"] + ["_native_math"] * 4 + ["native"] * 9


class SlowCheckpoints:
    """The runner's checkpoint writes, each taking `seconds`, logged with the DiT's step calls in `log`."""

    def __init__(self, runner: Runner, seconds: float, during_write=None) -> None:
        self.put, self.seconds, self.during_write, self.log = runner.files.put_checkpoint, seconds, during_write, []
        runner.files.put_checkpoint = self
        runner.dit_before = lambda name, args: name == "step" and self.log.append(("step", args[0].step + 1))

    def __call__(self, job_id: str, epoch: int, done: int, latents) -> str:
        if self.during_write is not None:
            self.during_write(done)
        time.sleep(self.seconds)
        self.log.append(("written", done))
        return self.put(job_id, epoch, done, latents)


def test_the_next_step_runs_while_the_step_before_is_written(replicas, tmp_path):
    runner = Runner(tmp_path, replicas)
    slow = SlowCheckpoints(runner, 0.5)
    job_id = runner.submit({"prompt": "a cat", "frames": 9, "steps": 3, "seed": 3})
    runner.run()
    assert runner.jobs.get(job_id).status == "completed"
    # step k + 1 is asked of the DiT before step k's checkpoint is written; each step ran once
    assert slow.log == [("step", 1), ("step", 2), ("written", 1), ("step", 3), ("written", 2), ("written", 3)]
    assert [e["step"] for e in runner.jobs.events_after(job_id, -1) if e["type"] == "step"] == [1, 2, 3]


def test_a_cancel_seen_at_a_step_s_write_drops_the_step_in_flight(replicas, tmp_path):
    runner = Runner(tmp_path, replicas)
    job_id = runner.submit({"prompt": "a cat", "frames": 9, "steps": 4, "seed": 3})
    slow = SlowCheckpoints(runner, 0.2, lambda done: done == 2 and runner.jobs.request_cancel(job_id))
    runner.run()
    job, events = runner.jobs.get(job_id), runner.jobs.events_after(job_id, -1)
    assert job.status == "cancelled"
    assert events[-1] == {**events[-1], "type": "cancelled", "step": 2}
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2]
    assert ("step", 3) in slow.log and ("written", 3) not in slow.log  # computed ahead, then dropped


def test_a_retry_of_the_step_started_ahead_is_recorded_after_the_step_before(replicas, tmp_path):
    runner = Runner(tmp_path, replicas)
    slow = SlowCheckpoints(runner, 0.5)
    failed = []

    def fail_step_2_once(name: str, args: tuple) -> None:
        slow.log.append(("step", args[0].step + 1))
        if args[0].step == 1 and not failed:  # step 2, asked while step 1's checkpoint is written
            failed.append(True)
            raise StoreUnavailable("injected")

    runner.dit_before = lambda name, args: name == "step" and fail_step_2_once(name, args)
    job_id = runner.submit({"prompt": "a cat", "frames": 9, "steps": 3, "seed": 3})
    runner.run()
    events = runner.jobs.events_after(job_id, -1)
    assert runner.jobs.get(job_id).status == "completed"
    assert slow.log.index(("step", 2)) < slow.log.index(("written", 1))  # failed while step 1 was written
    order = [(e["type"], e.get("step")) for e in events if e["type"] in ("step", "retry")]
    assert order == [("step", 1), ("retry", 2), ("step", 2), ("step", 3)]
