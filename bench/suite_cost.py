"""Where the test suite's time goes on the CPU: what starting the service, redeploying it and running a batch
cost, in wall seconds and in CPU seconds per process (tiny preset, a real local Ray, as tests/serving.py starts
it). The suite is CPU-bound on a 2-core machine, so the CPU seconds are what a faster suite must save.

    .venv/bin/python bench/suite_cost.py [--out suite_cost.json]

Measures, in one local Ray:
- ``start``: the local profile's service from nothing to healthy; the CPU seconds of each process of the Ray
  it started (replicas, controller, proxy, Ray's own);
- ``idle``: what the running service spends in 30 s without requests;
- ``redeploy_args``: a redeploy with changed app args (every replica replaced), and ``redeploy_runner``: one
  giving only the Runner deployment a new version (tests/serving.py ``new_version``: its replicas only);
- ``batch``: `run_batch` of a one-row manifest, twice (each run starts its own pipeline of stage actors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402
from serving import free_port, local_config, local_ray, new_version  # noqa: E402

from deployments.launch import deploy  # noqa: E402


def processes() -> list[tuple[psutil.Process, str]]:
    """This process and its descendants (its local Ray's), with their titles."""
    found = []
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            found.append((proc, " ".join(proc.cmdline()).strip()))
        except psutil.Error:
            continue
    return found


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) of each of `processes()`, with its title."""
    out = {}
    for proc, title in processes():
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (times.user + times.system, title[:60])
    return out


def machine_busy() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine since boot (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / hz, sum(fields) / hz


class Span:
    """Wall seconds, the machine's busy share and the CPU seconds each process spent between enter and exit."""

    def __enter__(self) -> Span:
        self.t0, self.cpu0, self.machine0 = time.monotonic(), cpu_by_process(), machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        cpu1, machine1 = cpu_by_process(), machine_busy()
        busy, total = (machine1[0] - self.machine0[0]), (machine1[1] - self.machine0[1])
        self.machine_busy_pct = round(100 * busy / total, 1) if total else None
        self.by_process = sorted(((round(cpu - self.cpu0.get(pid, (0.0, ""))[0], 2), title)
                                  for pid, (cpu, title) in cpu1.items()), reverse=True)

    def summary(self, top: int = 12) -> dict:
        return {"wall_s": round(self.wall, 2), "machine_busy_pct": self.machine_busy_pct,
                "cpu_s": round(sum(cpu for cpu, _ in self.by_process), 2),
                "top_processes": [{"cpu_s": cpu, "process": title} for cpu, title in self.by_process[:top]]}


def replicas() -> dict[str, int]:
    """Deployment name -> pid of its replica process."""
    prefix = "ServeReplica:pusa:"
    return {title.split(prefix, 1)[1].split()[0].split(".")[0]: proc.pid
            for proc, title in processes() if prefix in title}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="suite_cost.json")
    args = parser.parse_args()
    results: dict = {"cpus": psutil.cpu_count()}
    folder = Path(tempfile.mkdtemp(prefix="pusa-suite-cost-"))
    port = free_port()

    def config(**changes) -> ServeDeploySchema:
        conf = local_config(str(folder / "store"), port, **changes.get("local", {}))
        if "runner_version" in changes:
            new_version(conf["applications"][0], "Runner", changes["runner_version"])
        return ServeDeploySchema.model_validate(conf)

    with Span() as span:
        local_ray()
        assert not deploy(config(), 300)
    results["start"] = span.summary()
    try:
        with Span() as span:
            time.sleep(30)
        results["idle"] = span.summary(top=6)
        for name, changes in (("redeploy_args", {"local": {"runner": {"poll_s": 0.4}}}),
                              ("redeploy_runner", {"local": {"runner": {"poll_s": 0.4}}, "runner_version": "2"})):
            before = replicas()
            with Span() as span:
                assert not deploy(config(**changes), 300)
            after = replicas()
            results[name] = {**span.summary(top=6),
                             "replaced": sorted(k for k in after if before.get(k) != after[k])}
    finally:
        serve.shutdown()

    from pusa_batch.run import BatchSettings, run_batch

    manifest = folder / "one.jsonl"
    manifest.write_text(json.dumps({"custom_id": "a", "prompt": "a cat", "steps": 2, "size": "64x64", "seed": 1}) + "\n")
    results["batch"] = []
    for run in range(2):
        with Span() as span:
            summary = run_batch(str(manifest), str(folder / f"out{run}"), BatchSettings(), progress=False)
        assert summary["completed_total"] == 1, summary
        results["batch"].append(span.summary(top=6))
    Path(args.out).write_text(json.dumps(results, indent=1))
    for name, value in results.items():
        rows = value if isinstance(value, list) else [value]
        for row in rows:
            if isinstance(row, dict):
                print(f"{name}: wall {row['wall_s']} s, CPU {row['cpu_s']} s in this Ray's processes, machine "
                      f"{row['machine_busy_pct']}% busy" + (f", replaced {row['replaced']}" if "replaced" in row else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
