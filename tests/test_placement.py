"""A deployment that cannot be placed is reported at start-up within a bounded time.

Ray leaves a replica whose resources no node has pending forever; `pusa-serve` checks every
deployment's replica demand against the nodes and gives up after `--start-timeout`, naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from deployments.launch import actor_options, replica_demand, unplaceable
from serving import free_port, local_config

PUSA_SERVE = Path(sys.executable).parent / "pusa-serve"
A6000_DIT = {"DiT": {"ray_actor_options": {"num_cpus": 0, "resources": {"A6000": 1}}}}


def _leftovers(driver_pid: int) -> list[str]:
    """Ray processes still alive from the session a driver with this pid started."""
    mark = re.compile(rf"session_[\d_-]+_{driver_pid}\b")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if mark.search(" ".join(proc.info["cmdline"] or [])):
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_unplaceable_dit_fails_start_within_bounded_time(tmp_path):
    config = tmp_path / "a6000.yaml"
    config.write_text(yaml.safe_dump(local_config(str(tmp_path / "store"), free_port(), deployments=A6000_DIT)))
    # RAY_ADDRESS=local: start a private local Ray (no A6000 on it) even if another Ray runs on the machine.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    start = time.monotonic()
    proc = subprocess.Popen([str(PUSA_SERVE), str(config), "--start-timeout", "8"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - start
    print(f"pusa-serve exited {proc.returncode} after {elapsed:.1f}s")
    assert proc.returncode == 1, (out, err[-3000:])
    # 8 s of waiting plus starting a local Ray (~5-20 s on this machine, more under load).
    assert elapsed < 90, f"took {elapsed:.0f}s"
    assert "ready" not in out
    report = err[err.index("pusa-serve: not running after 8s:"):]
    assert "pusa/DiT" in report
    assert "pusa/DiT needs {'A6000': 1.0} per replica; no node has that" in report
    # It said so at once too, before waiting.
    assert "pusa-serve: waiting for the autoscaler: pusa/DiT needs {'A6000': 1.0}" in err
    # Nothing else is blamed on placement: the other deployments fit (CPU-only, num_cpus 0).
    assert not re.search(r"pusa/(Router|TextEncoder|VAE) needs", err)
    # The local Ray it started is gone with it.
    deadline = time.monotonic() + 15
    while _leftovers(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _leftovers(proc.pid)


# -- unplaceable() on synthetic node lists --------------------------------------------------------


def _config(deployments: dict) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(local_config("data", 8000, deployments=deployments))


HEAD = {"CPU": 2.0, "memory": 8e9, "object_store_memory": 2e9}
A6000_NODE = {"CPU": 16.0, "GPU": 2.0, "A6000": 2.0, "memory": 128e9}
GPU_NODE_WITHOUT_A6000 = {"CPU": 16.0, "GPU": 8.0, "accelerator_type:A100": 1.0}


def test_unplaceable_names_the_deployment_and_resource():
    config = _config(A6000_DIT)
    assert unplaceable(config, [HEAD]) == ["pusa/DiT needs {'A6000': 1.0} per replica; no node has that"]
    assert unplaceable(config, [HEAD, A6000_NODE]) == []
    # Other GPUs don't count: only the A6000 custom resource does.
    assert [p.split()[0] for p in unplaceable(config, [HEAD, GPU_NODE_WITHOUT_A6000])] == ["pusa/DiT"]


def test_unplaceable_needs_one_node_with_everything():
    """A replica's demand must fit on one node: CPUs on one and the card on another is not enough."""
    config = _config({"DiT": {"ray_actor_options": {"num_cpus": 4, "num_gpus": 1, "resources": {"A6000": 1}}}})
    cpu_node, card_only = {"CPU": 32.0}, {"CPU": 2.0, "GPU": 1.0, "A6000": 1.0}
    (line,) = unplaceable(config, [cpu_node, card_only])
    assert line.startswith("pusa/DiT needs") and "'CPU': 4.0" in line and "'A6000': 1.0" in line
    assert unplaceable(config, [cpu_node, {"CPU": 4.0, "GPU": 1.0, "A6000": 1.0}]) == []


def test_unplaceable_fractional_gpus_share_one_card():
    config = _config({name: {"ray_actor_options": {"num_cpus": 0, "num_gpus": 0.5, "resources": {"A6000": 0.5}}}
                      for name in ("TextEncoder", "VAE")})
    one_card = {"CPU": 1.0, "GPU": 1.0, "A6000": 1.0}
    assert unplaceable(config, [HEAD, one_card]) == []
    assert {p.split()[0] for p in unplaceable(config, [HEAD])} == {"pusa/TextEncoder", "pusa/VAE"}


@pytest.mark.parametrize("options, demand", [
    (None, {"CPU": 1.0}),  # no ray_actor_options: Serve's default of one CPU per replica
    ({"num_cpus": 0}, {}),
    ({"num_cpus": 2, "num_gpus": 1, "resources": {"A6000": 1}}, {"CPU": 2.0, "GPU": 1.0, "A6000": 1.0}),
])
def test_replica_demand_from_config(options, demand):
    dep = DeploymentSchema(name="DiT") if options is None else DeploymentSchema(name="DiT", ray_actor_options=options)
    assert replica_demand(actor_options(dep)) == demand
