"""The deployment configs: Serve configs, the Ray cluster launcher config and the KubeRay example.

Everything here is checked with Ray's own code (Serve's schema and app builder, the cluster launcher's
`prepare_config`/`validate_config`, the `ray start` CLI parser, the autoscaler's resource demand
scheduler, KubeRay's RayCluster-to-autoscaler translation) and without starting Ray or loading a model.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from sqlalchemy.engine import make_url
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app
from ray.serve.schema import ServeDeploySchema

from deployments.admission import check_exposure
from deployments.app import AppArgs
from deployments.launch import actor_options as options, loading_apps, replica_demand, unplaceable
from pusa_batch.run import BatchSettings
from pusa_jobs.cost import estimate_gpu_seconds
from pusa_model.presets import Preset
from pusa_model.request import parse_request, plan_request
from serving import stop_ray

try:
    from ray._common.utils import import_attr
except ImportError:  # older layout
    from ray._private.utils import import_attr

ROOT = Path(__file__).resolve().parent.parent
PROD = ROOT / "serve_config.yaml"
LOCAL = ROOT / "serve_config.local.yaml"
GPU = ROOT / "serve_config.gpu.yaml"
CLUSTER = ROOT / "cluster.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
STAGES = {"Router", "Runner", "TextEncoder", "VAE", "DiT"}
EXPERTS = {"DiTHigh", "DiTLow"}  # Pusa-Wan2.2's DiT deployments (app arg wan22_preset)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "SECRET", "PASSWORD")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments(config: ServeDeploySchema) -> dict:
    (app,) = config.applications
    return {d.name: d for d in app.deployments}


@pytest.fixture(scope="module")
def prod() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(load(PROD))


# -- Serve configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "expected"), [(PROD, STAGES | EXPERTS), (LOCAL, STAGES), (GPU, STAGES)],
                         ids=["production", "local", "gpu"])
def test_serve_config_validates_and_builds_its_deployments(path, expected):
    """The five stages; the production profile serves Pusa-Wan2.2 too, with a DiT deployment per expert."""
    config = ServeDeploySchema.model_validate(load(path))
    (app,) = config.applications
    # What the Serve controller does with the config, short of starting replicas (no __init__ runs).
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)
    graph = build_app(built, name=app.name)
    assert {d.name for d in graph.deployments} == expected
    assert graph.ingress_deployment_name == "Router"
    # Serve rejects a config that names a deployment the app doesn't have, so the names must match.
    assert set(deployments(config)) == expected


@pytest.mark.parametrize("path", [PROD, ROOT / "serve_config.2gpu.yaml", LOCAL], ids=["production", "2gpu", "local"])
def test_pusa_serve_first_deploys_the_loading_router_with_the_routers_options(path):
    """The light Router `pusa-serve` starts an application with: its name, route and the config's Router
    options; the real Router replaces it with a surge (new replica up before the old one stops)."""
    stop_ray()  # the local Ray an earlier module's service kept: building the app must start none
    config = ServeDeploySchema.model_validate(load(path))
    (app,) = config.applications
    (built,) = loading_apps(config, deployed=set())
    (deployment,) = built.deployments
    assert (built.name, built.route_prefix, built.ingress_deployment_name) == (app.name, "/", "Router")
    router = deployments(config)["Router"]
    assert deployment.num_replicas == router.num_replicas
    assert replica_demand(deployment.ray_actor_options) == replica_demand(options(router))
    assert deployment._deployment_config.max_surge_percent > 0
    assert loading_apps(config, deployed={app.name}) == []  # a running application is redeployed as it is
    assert not ray.is_initialized()  # building it started no Ray in this process (later tests start their own)


def test_vae_decode_dtype_reaches_the_vae_deployment():
    graph = build_app(import_attr("deployments.app:build_app")({"vae_decode_dtype": "bfloat16"}), name="app")
    (vae,) = (d for d in graph.deployments if d.name == "VAE")
    assert vae.init_kwargs["decode_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="vae_decode_dtype"):
        AppArgs.model_validate({"vae_decode_dtype": "float64"})


def test_the_vae_decodes_uploads_within_the_apis_media_limits():
    graph = build_app(import_attr("deployments.app:build_app")({"api": {"media": {"max_frames": 3000}}}), name="app")
    (vae,) = (d for d in graph.deployments if d.name == "VAE")
    assert vae.init_kwargs["media_limits"]["max_frames"] == 3000


def test_gpu_memory_caps_reach_each_gpu_deployment():
    graph = build_app(import_attr("deployments.app:build_app")(
        {"gpu_memory_gib": {"DiT": 47.5, "TextEncoder": 23.5, "VAE": 23.5}}), name="app")
    caps = {d.name: d.init_kwargs.get("memory_gib") for d in graph.deployments if d.name in ("DiT", "TextEncoder", "VAE")}
    assert caps == {"DiT": 47.5, "TextEncoder": 23.5, "VAE": 23.5}
    uncapped = build_app(import_attr("deployments.app:build_app")({}), name="app")
    assert all(d.init_kwargs.get("memory_gib") is None for d in uncapped.deployments if d.name == "DiT")
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        AppArgs.model_validate({"gpu_memory_gib": {"Router": 4}})
    with pytest.raises(ValueError, match="gpu_memory_gib"):
        AppArgs.model_validate({"gpu_memory_gib": {"DiT": 0}})
    with pytest.raises(ValueError, match="dit_parallel"):
        AppArgs.model_validate({"gpu_memory_gib": {"DiT": 40}, "dit_parallel": {"cfg": 2}})


def test_wan22_preset_adds_a_dit_deployment_per_expert():
    """``wan22_preset`` binds the DiT class twice more, DiTHigh (expert 0) and DiTLow (expert 1), each with its
    own memory cap; the Router and Runner learn both models; TextEncoder and VAE stay one each."""
    graph = build_app(import_attr("deployments.app:build_app")(
        {"wan22_preset": "tiny-wan2.2", "gpu_memory_gib": {"DiTHigh": 44, "DiTLow": 43}}), name="app")
    by_name = {d.name: d for d in graph.deployments}
    assert set(by_name) == STAGES | {"DiTHigh", "DiTLow"}
    for name, expert, cap in (("DiTHigh", 0, 44), ("DiTLow", 1, 43)):
        kwargs = by_name[name].init_kwargs
        assert (kwargs["preset"], kwargs["expert"], kwargs["memory_gib"]) == ("tiny-wan2.2", expert, cap)
    assert by_name["DiT"].init_kwargs["preset"] == "tiny" and "expert" not in by_name["DiT"].init_kwargs
    models = {"pusa-v1": "tiny", "pusa-wan2.2": "tiny-wan2.2"}
    assert by_name["Router"].init_kwargs["models"] == by_name["Runner"].init_kwargs["models"] == models
    with pytest.raises(ValueError, match="wan22_preset"):
        AppArgs.model_validate({"wan22_preset": "tiny"})


def test_each_model_has_its_own_lora_registry():
    """``loras`` (one file an entry) go to Pusa V1's DiT, ``wan22_loras`` (a file per expert) to DiTHigh and
    DiTLow; an entry of the wrong shape for its model fails the deploy."""
    pair = {"lightning": {"path": "high.safetensors", "path_2": "low.safetensors", "fast": True}}
    one = {"style": {"path": "style.safetensors"}}
    graph = build_app(import_attr("deployments.app:build_app")(
        {"wan22_preset": "tiny-wan2.2", "loras": one, "wan22_loras": pair}), name="app")
    registries = {d.name: set(d.init_kwargs["loras"]) for d in graph.deployments if d.name.startswith("DiT")}
    assert registries == {"DiT": {"style"}, "DiTHigh": {"lightning"}, "DiTLow": {"lightning"}}
    with pytest.raises(ValueError, match="wan22_loras.style"):
        AppArgs.model_validate({"wan22_loras": one})
    with pytest.raises(ValueError, match="loras.lightning"):
        AppArgs.model_validate({"loras": pair})


def test_gpu_profile_shares_one_card():
    config = ServeDeploySchema.model_validate(load(GPU))
    deps = deployments(config)
    gpus = {name: options(dep).get("num_gpus", 0) for name, dep in deps.items()}
    assert gpus["Router"] == gpus["Runner"] == 0
    assert 0 < gpus["DiT"] < 1 and 0 < gpus["TextEncoder"] < 1 and 0 < gpus["VAE"] < 1
    assert sum(gpus.values()) <= 1  # the three GPU stages fit one card's worth of Ray's GPU resource
    assert unplaceable(config, [{"CPU": 16, "GPU": 1}]) == []
    args = AppArgs.model_validate(load(GPU)["applications"][0]["args"])
    assert args.preset == "pusa-v1" and args.lora_base == "cpu"
    assert {(s.width, s.height, s.frames, s.guidance) for s in args.dit_warmup} == {(832, 480, 81, 5.0), (832, 480, 81, 1.0)}


def test_production_app_and_proxies(prod):
    assert prod.proxy_location.value == "EveryNode"
    assert (prod.http_options.host, prod.http_options.port) == ("0.0.0.0", 8000)
    (app,) = prod.applications
    assert app.import_path == "deployments.app:build_app"
    assert app.args["preset"] == "pusa-v1"
    assert app.args["store"] == "s3://pusa-jobs/prod"
    assert app.args["vae_tiling"] is True
    env = app.runtime_env["env_vars"]
    assert {"PUSA_MODEL_SOURCE", "PUSA_S3_ENDPOINT"} <= set(env)
    # the jobs live in PostgreSQL; its password comes from the nodes' environment, not from the URL
    database = make_url(app.args["database"])
    assert database.get_backend_name() == "postgresql" and database.password is None
    assert app.args["webhooks"]["signing_key_env"] not in env


@pytest.mark.parametrize("path", [PROD, LOCAL, CLUSTER, DEPLOY_DOC], ids=lambda p: p.name)
def test_no_credentials_in_config_files(path):
    text = path.read_text()
    for key in SECRET_KEYS:
        # A placeholder (`KEY=...`) is fine; a value is not.
        assert not re.search(rf"^\s*[\w-]*{key}\w*\s*[:=]\s*(?!\.\.\.)\S", text, re.M | re.I), \
            f"{path.name} sets {key}"


def test_production_resources(prod):
    deps = deployments(prod)
    # Each DiT replica, and each of Pusa-Wan2.2's experts: exactly one whole GPU, and it is an A6000.
    for name in ("DiT", *EXPERTS):
        dit = options(deps[name])
        assert dit["num_gpus"] == 1 and dit["resources"] == {"A6000": 1}, name
    # TextEncoder and VAE: fractional, and the two fit together on one A6000.
    te, vae = options(deps["TextEncoder"]), options(deps["VAE"])
    for o in (te, vae):
        assert 0 < o["num_gpus"] < 1 and o["resources"]["A6000"] == o["num_gpus"]
    assert te["num_gpus"] + vae["num_gpus"] <= 1
    assert te["resources"]["A6000"] + vae["resources"]["A6000"] <= 1
    # Router and Runner: CPU only, so the head (no GPU, no A6000) can hold them.
    for name in ("Router", "Runner"):
        cpu_only = options(deps[name])
        assert not cpu_only.get("num_gpus") and "A6000" not in (cpu_only.get("resources") or {})


def test_production_autoscaling_and_timeouts(prod):
    deps = deployments(prod)
    for name in ("DiT", "TextEncoder", "VAE", *EXPERTS):
        auto = deps[name].autoscaling_config
        assert auto, f"{name} has no autoscaling_config"
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
        assert auto["downscale_delay_s"] >= auto["upscale_delay_s"]
    for name in ("Router", "Runner"):
        assert "autoscaling_config" not in deps[name].model_fields_set
        assert deps[name].num_replicas >= 2  # one lost replica never takes the API or the jobs down
    assert deps["DiT"].autoscaling_config["target_ongoing_requests"] == 1
    assert deps["DiT"].autoscaling_config["max_replicas"] >= 8
    assert deps["DiT"].max_ongoing_requests == 1
    assert deps["VAE"].max_ongoing_requests <= 2
    assert deps["TextEncoder"].max_ongoing_requests <= 8
    assert deps["Router"].max_ongoing_requests >= 200  # SSE streams are long-lived requests
    # A stopped runner waits up to drain_wait_s for each job's step, then releases it: Serve must give it
    # that long, plus its wait loop and the release; a DiT replica must outlast the step it runs.
    (app,) = prod.applications
    runner = app.args["runner"]
    drain = runner["drain_wait_s"] + deps["Runner"].graceful_shutdown_wait_loop_s
    assert deps["Runner"].graceful_shutdown_timeout_s >= drain + 10
    for name in ("DiT", *EXPERTS):
        assert deps[name].graceful_shutdown_timeout_s >= runner["drain_wait_s"]
        assert deps[name].max_ongoing_requests == 1 and deps[name].autoscaling_config["target_ongoing_requests"] == 1
    # A DiT step takes tens of seconds at 720p; a health check must outlast one.
    for name in ("DiT", "VAE", *EXPERTS):
        assert deps[name].health_check_timeout_s >= 120
    # The runners can keep every DiT replica busy at full scale, and no more; a Pusa-Wan2.2 job has a step on
    # one expert at a time, so each expert's maximum is at most the runners' jobs.
    running = deps["Runner"].num_replicas * runner["max_running_jobs"]
    assert running == deps["DiT"].autoscaling_config["max_replicas"]
    assert all(deps[name].autoscaling_config["max_replicas"] <= running for name in EXPERTS)


def test_production_config_places_on_an_a6000_cluster_only(prod):
    head = {"CPU": 16.0, "memory": 64e9}
    a6000_node = {"CPU": 32.0, "GPU": 2.0, "A6000": 2.0, "memory": 256e9}
    assert unplaceable(prod, [head, a6000_node]) == []
    missing = unplaceable(prod, [head])
    assert {line.split()[0] for line in missing} == {"pusa/DiT", "pusa/TextEncoder", "pusa/VAE", "pusa/DiTHigh",
                                                     "pusa/DiTLow"}
    assert replica_demand(options(deployments(prod)["DiT"])) == {"CPU": 2.0, "GPU": 1.0, "A6000": 1.0}


def test_wan22_experts_on_one_a6000_with_int8(prod):
    """The alternative layout of docs/deploy.md: both experts on one card, their GEMMs in INT8
    (`wan22_dit_options`), each replica half an A6000; Pusa V1's DiT keeps the profile's options."""
    config = load(PROD)
    (app,) = config["applications"]
    app["args"]["wan22_dit_options"] = {**app["args"]["dit_options"], "quantize": "int8"}
    for dep in app["deployments"]:
        if dep["name"] in EXPERTS:
            dep["ray_actor_options"] = {**dep["ray_actor_options"], "num_gpus": 0.5, "resources": {"A6000": 0.5}}
    schema = ServeDeploySchema.model_validate(config)
    graph = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"]),
                      name=app["name"])
    kwargs = {d.name: d.init_kwargs for d in graph.deployments}
    assert kwargs["DiTHigh"]["options"]["quantize"] == kwargs["DiTLow"]["options"]["quantize"] == "int8"
    assert "quantize" not in kwargs["DiT"]["options"]
    high, low = (replica_demand(options(deployments(schema)[name])) for name in EXPERTS)
    assert high["A6000"] + low["A6000"] == 1 and high["GPU"] + low["GPU"] == 1  # one card holds the pair


def test_production_replicas_take_at_most_one_gpu():
    """Two-GPU DiT replicas live in serve_config.2gpu.yaml (tests/test_dit_group.py checks it)."""
    for dep in deployments(ServeDeploySchema.model_validate(load(PROD))).values():
        assert options(dep).get("num_gpus", 0) <= 1, dep.name


# -- cluster.yaml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    """cluster.yaml as `ray up` prepares it (defaults filled, setup commands merged), validated."""
    raw = load(CLUSTER)
    config = prepare_config(raw)
    validate_config(config)
    return config


def test_cluster_yaml_passes_ray_validation(cluster):
    assert cluster["provider"]["type"] == "local"
    (node_type,) = cluster["available_node_types"].values()
    pool = len(cluster["provider"]["worker_ips"])
    # The whole pool stays up: the local provider can't add a machine for an A6000 demand (see below).
    assert node_type["min_workers"] == node_type["max_workers"] == pool >= 1
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["file_mounts"]


def test_cluster_installs_the_pinned_stack(cluster):
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ray[serve,data]==2.60.0"' in pyproject
    install = (ROOT / "scripts" / "install.sh").read_text()
    (torch_pin,) = set(re.findall(r"torch==[\d.]+", install))
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        assert any("./scripts/install.sh" in c for c in commands)
    worker = " ".join(cluster["worker_setup_commands"])
    assert torch_pin in worker and "torch.cuda.is_available()" in worker and "gpu]" in worker


def _run_start_command(command: str, tmp_path: Path, gpus: list[str]) -> list[str]:
    """Run a start command with fake `nvidia-smi` and `ray`; return the argv `ray` got."""
    home, fake_bin, argv_file = tmp_path / "home", tmp_path / "bin", tmp_path / "argv.json"
    ray_bin = home / "pusa-serve" / ".venv" / "bin"
    for folder in (ray_bin, fake_bin):
        folder.mkdir(parents=True, exist_ok=True)
    scripts = {
        fake_bin / "nvidia-smi": "#!/bin/sh\nprintf '%s\\n' " + " ".join(shlex.quote(g) for g in gpus) + "\n",
        ray_bin / "ray": f"#!{sys.executable}\nimport json, sys\n"
                         f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n",
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {"HOME": str(home), "PATH": f"{fake_bin}:/usr/bin:/bin", "RAY_HEAD_IP": "192.0.2.10"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return json.loads(argv_file.read_text())


def _ray_start_params(argv: list[str]) -> dict:
    """Parse `ray start ...` arguments with Ray's own CLI definition."""
    from ray.scripts.scripts import start

    assert argv[0] == "start"
    return start.make_context("start", argv[1:]).params


def test_worker_start_command_advertises_a6000_per_card(cluster, tmp_path):
    (command,) = [c for c in cluster["worker_start_ray_commands"] if " start " in c]
    gpus = ["NVIDIA RTX A6000", "NVIDIA RTX A6000"]
    params = _ray_start_params(_run_start_command(command, tmp_path, gpus))
    assert params["address"] == "192.0.2.10:6379"
    assert json.loads(params["resources"]) == {"A6000": 2}
    assert params["num_gpus"] == 2
    assert params["metrics_export_port"] == 8080  # where Prometheus scrapes every node (docs/deploy.md)


def test_head_start_command_has_no_gpus(cluster, tmp_path):
    (command,) = [c for c in cluster["head_start_ray_commands"] if " start " in c]
    params = _ray_start_params(_run_start_command(command, tmp_path, []))
    assert params["head"] is True
    assert params["num_gpus"] == 0
    assert "A6000" not in (params["resources"] or "")
    assert params["autoscaling_config"] and params["port"] == 6379
    assert params["metrics_export_port"] == 8080


class _Provider:
    """Just enough of a node provider for the resource demand scheduler: a head and one worker."""

    def __init__(self, worker_type: str, head_type: str) -> None:
        self.tags = {"head": {TAG_RAY_USER_NODE_TYPE: head_type, TAG_RAY_NODE_KIND: NODE_KIND_HEAD},
                     "w1": {TAG_RAY_USER_NODE_TYPE: worker_type, TAG_RAY_NODE_KIND: NODE_KIND_WORKER}}

    def node_tags(self, node_id):
        return self.tags[node_id]

    def internal_ip(self, node_id):
        return {"head": "192.0.2.10", "w1": "192.0.2.11"}[node_id]

    def non_terminated_nodes(self, tag_filters):
        return list(self.tags)


def _nodes_to_launch(config: dict, worker_type: str, worker: dict, demand: list[dict]) -> dict:
    """Node types Ray's autoscaler would launch for `demand`, with the head and a full worker running."""
    scheduler = ResourceDemandScheduler(
        _Provider(worker_type, config["head_node_type"]), config["available_node_types"], config["max_workers"],
        config["head_node_type"], config["upscaling_speed"])
    static = {"192.0.2.10": {"CPU": 8}, "192.0.2.11": worker}
    unused = {"192.0.2.10": {"CPU": 1}, "192.0.2.11": {}}
    launch, _ = scheduler.get_nodes_to_launch(
        ["head", "w1"], {}, demand, unused, [], static, [], NodeAvailabilitySummary({}))
    return launch


def test_local_provider_cannot_scale_nodes_for_a6000(prod):
    """Why cluster.yaml keeps the whole pool up: with an elastic local pool (min 1, max 4) and one
    A6000 worker running, Ray's autoscaler launches nothing for a waiting DiT replica - it learns only
    CPU/GPU/memory of the local node type - while a GPU-only demand would get a machine."""
    raw = load(CLUSTER) | {"min_workers": 1, "max_workers": 4}
    config = prepare_config(raw)
    (worker_type,) = config["available_node_types"]
    worker = {"CPU": 32, "GPU": 2, "A6000": 2}
    dit = replica_demand(options(deployments(prod)["DiT"]))
    assert _nodes_to_launch(config, worker_type, worker, [dit] * 2) == {}
    gpu_only = {k: v for k, v in dit.items() if k != "A6000"}
    assert _nodes_to_launch(config, worker_type, worker, [gpu_only] * 2) == {worker_type: 1}


# -- docs/deploy.md: the KubeRay RayService example -----------------------------------------------


@pytest.fixture(scope="module")
def rayservice() -> dict:
    blocks = re.findall(r"^```ya?ml\n(.*?)^```", DEPLOY_DOC.read_text(), re.S | re.M)
    (service,) = [yaml.safe_load(b) for b in blocks if re.search(r"^kind: RayService$", b, re.M)]
    return service


def test_kuberay_example_embeds_the_production_serve_config(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == load(PROD), "docs/deploy.md's serveConfigV2 differs from serve_config.yaml"
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"


def test_kuberay_example_scales_a6000_pods(rayservice, prod):
    cluster_spec = rayservice["spec"]["rayClusterConfig"]
    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (group,) = cluster_spec["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "A6000" in json.dumps(group["template"]["spec"]["nodeSelector"])
    # KubeRay's own translation of the RayCluster into the autoscaler's node types.
    config = _derive_autoscaling_config_from_ray_cr({"metadata": rayservice["metadata"], "spec": cluster_spec})
    node_type = config["available_node_types"][group["groupName"]]
    assert node_type["resources"]["A6000"] == 1 and node_type["resources"]["GPU"] == 1
    assert config["available_node_types"]["headgroup"]["resources"]["GPU"] == 0
    deps = deployments(prod)
    dit = replica_demand(options(deps["DiT"]))
    te_vae = {k: replica_demand(options(deps["TextEncoder"])).get(k, 0) + replica_demand(options(deps["VAE"])).get(k, 0)
              for k in ("CPU", "GPU", "A6000")}
    for demand in (dit, te_vae):  # one pod holds a DiT replica, or a TextEncoder+VAE pair
        assert all(node_type["resources"].get(k, 0) >= v for k, v in demand.items()), demand
    # A waiting DiT replica makes the autoscaler add an a6000 pod (cf. the local provider above).
    worker = dict(node_type["resources"])
    launch = _nodes_to_launch(config, group["groupName"], worker, [dit])
    assert launch == {group["groupName"]: 1}


# -- who can reach what --------------------------------------------------------------------------------


def test_head_dashboard_listens_on_loopback(cluster, tmp_path):
    (command,) = [c for c in cluster["head_start_ray_commands"] if " start " in c]
    assert _ray_start_params(_run_start_command(command, tmp_path, []))["dashboard_host"] == "127.0.0.1"


@pytest.mark.parametrize("path, auth", [(PROD, "keys"), (ROOT / "serve_config.2gpu.yaml", "keys"), (LOCAL, "none"),
                                        (GPU, "none")])
def test_only_loopback_profiles_run_without_keys(path, auth):
    config = load(path)
    api = AppArgs.model_validate(config["applications"][0]["args"]).api
    assert api.auth == auth
    check_exposure(api.auth, config["http_options"]["host"])  # each shipped profile passes the start-up rule


def test_pusa_serve_refuses_a_public_address_without_keys(tmp_path):
    config = load(LOCAL)
    config["http_options"]["host"] = "0.0.0.0"
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "deployments.serve_command", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        "pusa-serve: refusing to start pusa: api.auth is 'none' but the HTTP proxy listens on 0.0.0.0: turn keys "
        "on (api.auth: keys) or listen on 127.0.0.1"]


def test_production_cost_limit_admits_a_720p_clip_and_refuses_the_largest_request(prod):
    api = AppArgs.model_validate(load(PROD)["applications"][0]["args"]).api
    preset = Preset(name="pusa-v1", source="unused")
    cost = lambda **r: estimate_gpu_seconds(plan_request(parse_request({"prompt": "p", **r}), preset),  # noqa: E731
                                            api.cost.table)
    assert cost(width=1280, height=720, frames=81, steps=50) <= api.cost.max_gpu_seconds
    assert cost(width=1920, height=1920, frames=241, steps=50) > 10 * api.cost.max_gpu_seconds
    assert cost(width=832, height=480, frames=81, steps=10) <= api.quotas.gpu_seconds_per_day / 20


def test_batch_config_places_every_stage_on_a6000_cards():
    settings = BatchSettings.load(ROOT / "batch_config.yaml")
    assert settings.preset == "pusa-v1"
    for stage in (settings.conditioning, settings.text, settings.dit, settings.decode):
        assert stage.num_gpus > 0 and stage.resources == {"A6000": stage.num_gpus}
    assert settings.dit.num_gpus == 1  # one whole card per DiT actor, as a DiT replica


@pytest.mark.parametrize("path", [PROD, ROOT / "serve_config.2gpu.yaml"], ids=["production", "2gpu"])
def test_production_batches_run_on_a6000_within_their_cap(path):
    (app,) = load(path)["applications"]
    settings = BatchSettings.model_validate({"preset": app["args"]["preset"], **app["args"]["batch"]})
    stages = (settings.conditioning, settings.text, settings.dit, settings.decode)
    for stage in stages:
        assert stage.num_gpus > 0 and stage.resources == {"A6000": stage.num_gpus}
    assert settings.dit.num_gpus == 1
    assert sum(s.concurrency * s.num_gpus for s in stages) == 3.5  # the cap the config's comment states
    assert settings.nice == 10  # the batch's actors yield the CPU to the online replicas
