"""What the metrics and the job logs cost per denoising step, on the CPU, with and without, in one run.

Inside a Ray actor placed like the replicas (``num_cpus: 0``), on a local Ray whose metrics agent
exports (the service's setting), with Serve's logger writing JSON lines to a file as the configs'
``logging_config: {encoding: JSON}`` makes it do (Ray's own `JSONFormatter`), one *step* is what the
service adds to a denoising step for operators:

- in the runner: the step histogram, the checkpoint timer, the ``step`` job event (one JSON log line);
- in the DiT replica: the job's id bound for the call and the ``dit_step`` stage histogram.

*without* runs the same loop with none of it. Cost per step = (with − without) / steps, the median over
``--rounds`` rounds of ``--steps`` steps, rounds of the two taking turns. The issue's goal: ≤ 1 ms.

Usage::

    .venv/bin/python bench/metrics_cost.py
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

GOAL_US = 1000.0


@ray.remote(num_cpus=0)
class StepObserver:
    """Times `steps` denoising steps' worth of observability calls, or of nothing."""

    def __init__(self, log_path: str) -> None:
        from ray._common.formatters import JSONFormatter

        import pusa_jobs.observability  # noqa: F401 - imports ray.serve, which resets its logger first

        handler = logging.FileHandler(log_path)
        handler.setFormatter(JSONFormatter())
        serve_logger = logging.getLogger("ray.serve")
        serve_logger.handlers[:] = [handler]
        serve_logger.setLevel(logging.INFO)
        serve_logger.propagate = False

    def run(self, steps: int, observe: bool) -> float:
        from pusa_jobs.observability import job_logging, log_job_event, metrics, timed

        job = "video_0000000000000000bench01"
        job_tags = {"task": "t2v", "preset": "tiny"}
        stage_tags = {"stage": "dit_step", "deployment": "DiT", "preset": "tiny", "gpu": "cpu"}
        m = metrics()
        started = time.perf_counter()
        for k in range(steps):
            if not observe:
                continue
            with job_logging(job):  # the DiT replica's side
                m.stage.observe(0.0123, tags=stage_tags)
            m.step.observe(0.0234, tags=job_tags)  # the runner's side
            with timed(m.checkpoint, store="file"):
                pass
            log_job_event("step", job, step=k + 1, total=steps, seconds=0.0234, elapsed_s=0.1 * k, checkpoint=True)
        return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=free_port(),
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    with tempfile.TemporaryDirectory() as tmp:
        observer = StepObserver.remote(str(Path(tmp) / "replica.log"))
        ray.get(observer.run.remote(100, True))  # warm-up: metrics created, file opened
        cost_us = []
        for _ in range(args.rounds):
            without = ray.get(observer.run.remote(args.steps, False))
            with_ = ray.get(observer.run.remote(args.steps, True))
            cost_us.append((with_ - without) / args.steps * 1e6)
        lines = sum(1 for _ in open(Path(tmp) / "replica.log"))
    median = statistics.median(cost_us)
    print(f"{os.cpu_count()}-core {platform.machine()} CPU, ray {ray.__version__}, Python {platform.python_version()}")
    print(f"observability per step: median {median:.1f} µs (rounds: {', '.join(f'{c:.1f}' for c in cost_us)}); "
          f"goal ≤ {GOAL_US:.0f} µs: {'met' if median <= GOAL_US else 'NOT met'}; {lines} JSON lines written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
