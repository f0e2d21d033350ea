"""Ray's fake autoscaling cluster on this machine: a head `Node` of this process with the
`fake_multinode` provider's autoscaler, whose monitor starts worker "nodes" as its own children.

Not `AutoscalingCluster.start()`, which runs `ray stop --force` and would kill every Ray on the machine,
and not `Cluster`, which points `/tmp/ray/ray_current_cluster` at it. At the end everything it started,
and only that, is stopped, by pid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from ray._private.node import Node
from ray._private.parameter import RayParams
from ray._private.services import get_node_ip_address

from serving import free_port

FAST_METRICS = {  # Serve pushes autoscaling metrics every 10 s by default
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
HEAD_RESOURCES = {"CPU": 2, "pusa_head": 100}  # `pusa_head`: a custom resource only the head has


def fake_cluster_config(gcs_address: str, worker_types: dict[str, dict], max_workers: int) -> dict:
    """The fake_multinode provider's cluster config (cf. ray's fake_multi_node/example.yaml)."""
    return {
        "cluster_name": "pusa-fake-a6000",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": HEAD_RESOURCES, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@contextmanager
def fake_autoscaling_cluster(folder: Path, worker_types: dict[str, dict], max_workers: int) -> Iterator[str]:
    """Start the head (with the autoscaler); yield its GCS address; stop every process it started."""
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **FAST_METRICS}
    saved = {key: os.environ.get(key) for key in [*env, "RAY_ADDRESS"]}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(env)  # inherited by the head's processes, the monitor and its nodes
    gcs_address = f"{get_node_ip_address()}:{free_port()}"
    config_file = folder / "fake_cluster.json"
    config_file.write_text(json.dumps(fake_cluster_config(gcs_address, worker_types, max_workers)))
    params = RayParams(
        num_cpus=HEAD_RESOURCES["CPU"], num_gpus=0, resources={"pusa_head": HEAD_RESOURCES["pusa_head"]},
        object_store_memory=200 * 1024 * 1024, gcs_server_port=int(gcs_address.rsplit(":", 1)[1]),
        autoscaling_config=str(config_file), include_dashboard=True, dashboard_port=free_port(),
        dashboard_agent_listen_port=free_port(), min_worker_port=0, max_worker_port=0,
    )
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    head = Node(params, head=True, shutdown_at_exit=True, spawn_reaper=True)
    try:
        yield head.gcs_address
    finally:
        # What the head started, listed before its monitor dies and orphans the worker nodes.
        started = [p for p in me.children(recursive=True) if p.pid not in before]
        head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        for proc in started:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(started, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
