"""Every file under cluster/ checked the way Ray and KubeRay will read it, so a typo fails here, not on a cloud bill."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from pipelines.ray_private import validate_cluster_yaml
from pipelines.ray_runtime import RAY_START_ENV

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP_YAMLS = sorted(CLUSTER.glob("*.yaml"))
RAY_UP_YAMLS = [p for p in RAY_UP_YAMLS if "provider" in (yaml.safe_load(p.read_text()) or {})]
KUBERAY_YAMLS = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _ray_up_config(path: Path) -> dict:
    """What `ray up` does before it talks to a cloud: defaults merged in, then the schema and its checks."""
    return validate_cluster_yaml(yaml.safe_load(path.read_text()))


def test_every_provider_has_a_cluster_yaml():
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in RAY_UP_YAMLS}
    assert {"aws", "gcp", "local"} <= providers


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda p: p.name)
def test_ray_up_yaml_passes_rays_validation(path):
    config = _ray_up_config(path)
    assert config["head_node_type"] in config["available_node_types"]
    # The project reaches every node and gets installed there.
    assert any("visionflow" in remote for remote in config["file_mounts"])
    assert any("pip install" in cmd and "visionflow" in cmd for cmd in config["setup_commands"])
    # Token auth on every node, with the token the client holds.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    # The worker pool stays warm between Ray Data epochs (pipelines/ray_runtime.py).
    assert all(f"{k}={v}" in c for c in starts if "ray start" in c for k, v in RAY_START_ENV.items())
    assert "~/.ray/auth_token" in config["file_mounts"]
    # What .gitignore keeps out of git stays off the nodes too.
    assert {".venv", "data", "runs"} <= set(config["rsync_exclude"])


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yamls_have_a_cpu_head_and_an_autoscaling_gpu_group(name):
    config = _ray_up_config(CLUSTER / name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu_groups = {k: v for k, v in workers.items() if _gpus(v, config["provider"]["type"]) > 0}
    assert _gpus(head, config["provider"]["type"]) == 0, "the head must be a CPU node"
    assert gpu_groups, f"{name}: no GPU worker group"
    for group in gpu_groups.values():
        assert group["min_workers"] == 0 < group["max_workers"], "GPU workers must scale from zero"


def _gpus(node_type: dict, provider: str) -> int:
    """GPUs a node type brings: stated in resources, or (AWS) implied by the instance family."""
    if "GPU" in node_type["resources"]:
        return node_type["resources"]["GPU"]
    if provider == "aws":
        return 1 if re.match(r"^(g|p)\d", node_type["node_config"]["InstanceType"]) else 0
    accels = node_type["node_config"].get("guestAccelerators", [])
    return sum(a["acceleratorCount"] for a in accels)


def test_gcp_gpu_resources_match_the_attached_accelerators():
    config = _ray_up_config(CLUSTER / "gcp.yaml")
    for node_type in config["available_node_types"].values():
        accels = node_type["node_config"].get("guestAccelerators", [])
        assert node_type["resources"].get("GPU", 0) == sum(a["acceleratorCount"] for a in accels)
        if accels:  # GCP refuses GPU VMs that live-migrate
            assert {"onHostMaintenance": "TERMINATE"} in node_type["node_config"]["scheduling"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.__setitem__("max_worker", 2), jsonschema.ValidationError),          # misspelt key
    (lambda c: c.__setitem__("head_node_type", "head.gpu"), ValueError),            # unknown node type
    (lambda c: c["available_node_types"]["worker.gpu"].__setitem__("min_workers", 99), ValueError),
    (lambda c: c["available_node_types"]["worker.gpu"].pop("node_config"), jsonschema.ValidationError),
])
def test_rays_validation_catches_typos(mutate, error):
    """The check the tests rely on really rejects broken files."""
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    mutate(config)
    with pytest.raises(error):
        validate_cluster_yaml(config)


# --- KubeRay -------------------------------------------------------------------------------------

# The fields the KubeRay v1 CRDs (and the pod spec inside them) require.
_GROUP_REQUIRED = ("rayStartParams", "template")
_WORKER_REQUIRED = ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template")


def _check_cluster_spec(spec: dict, where: str) -> list[dict]:
    """Required fields of a RayCluster spec; returns every container it declares."""
    missing = [f"{where}.headGroupSpec"] if "headGroupSpec" not in spec else []
    head = spec.get("headGroupSpec", {})
    missing += [f"{where}.headGroupSpec.{f}" for f in _GROUP_REQUIRED if f not in head]
    containers = list(head.get("template", {}).get("spec", {}).get("containers", []))
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        missing += [f"{where}.workerGroupSpecs[{i}].{f}" for f in _WORKER_REQUIRED if f not in group]
        assert group.get("minReplicas", 0) <= group.get("maxReplicas", 0), f"{where}.workerGroupSpecs[{i}]"
        containers += group.get("template", {}).get("spec", {}).get("containers", [])
    assert not missing, f"missing required fields: {missing}"
    assert spec.get("rayVersion") == ray.__version__, f"{where}.rayVersion must match the Ray the code is built on"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: every container needs a name and an image"
        assert str(c["image"]).count(":") == 1, f"{where}: pin the image tag ({c['image']})"
    return containers


def _kuberay(kind: str) -> dict:
    docs = [yaml.safe_load(p.read_text()) for p in KUBERAY_YAMLS]
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} manifest under cluster/kuberay/"
    doc = found[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    return doc


def _has_gpu_workers(containers: list[dict]) -> bool:
    return any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers)


def _token_auth(containers: list[dict]) -> bool:
    return all(any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token" for e in c.get("env", []))
               for c in containers)


def test_raycluster_manifest():
    doc = _kuberay("RayCluster")
    containers = _check_cluster_spec(doc["spec"], "RayCluster.spec")
    assert _has_gpu_workers(containers) and _token_auth(containers)


def test_rayjob_runs_the_pipeline_with_a_valid_command_line():
    from pipelines.cli import build_parser

    doc = _kuberay("RayJob")
    spec = doc["spec"]
    containers = _check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    assert _has_gpu_workers(containers) and _token_auth(containers)
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "visionflow" and argv[1] == "run"
    args = build_parser(argv[1:]).parse_args(argv[1:])  # the entrypoint is a command line visionflow accepts
    assert (ROOT / args.config).is_file()
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_rayservice_serves_the_detection_app_with_valid_args():
    from pipelines.serve.config import ServeArgs

    doc = _kuberay("RayService")
    containers = _check_cluster_spec(doc["spec"]["rayClusterConfig"], "RayService.spec.rayClusterConfig")
    assert _has_gpu_workers(containers) and _token_auth(containers)
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])  # a string in the CRD
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pipelines.serve.app:build_app"
    args = ServeArgs.model_validate(app["args"])
    assert args.models and not args.missing_weights()
    # The same application `visionflow serve` runs from cluster/serve/.
    serve_yamls = [yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "serve").glob("*.yaml"))]
    import_paths = {a["import_path"] for y in serve_yamls for a in y.get("applications", [])}
    if serve_yamls:
        assert app["import_path"] in import_paths


def test_missing_required_field_is_reported():
    spec = copy.deepcopy(_kuberay("RayCluster")["spec"])
    del spec["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(AssertionError, match=r"workerGroupSpecs\[0\]\.groupName"):
        _check_cluster_spec(spec, "RayCluster.spec")


def test_runtime_env_and_dockerfile_match_the_installed_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-" in dockerfile
    for path in RAY_UP_YAMLS:
        image = (yaml.safe_load(path.read_text()).get("docker") or {}).get("image")
        if image:
            assert image.startswith(f"rayproject/ray:{ray.__version__}-") or "CHANGE" in path.read_text()
