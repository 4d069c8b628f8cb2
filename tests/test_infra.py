"""infra/: every file parses, and what can be checked offline is checked.

Entrypoints exist, image tags and Ray versions agree across files, nothing binds 0.0.0.0
without authentication, Ray token authentication is on everywhere, resources are consistent,
and the two scripts behave (submit.sh refuses what it must; serve_local.sh serves loopback).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.harness.serve_local import ServeLocal

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
IMAGE_RE = re.compile(r"ghcr\.io/latentforge/latentforge:([\w.\-]+)")
K8S = sorted((INFRA / "k8s").glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dockerfile() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_clusters() -> list[tuple[str, dict]]:
    """(file, RayCluster spec) for the standing cluster and every RayJob's own cluster."""
    out = []
    for path in K8S:
        for doc in _docs(path):
            if doc.get("kind") == "RayCluster":
                out.append((path.name, doc["spec"]))
            elif doc.get("kind") == "RayJob":
                out.append((path.name, doc["spec"]["rayClusterSpec"]))
    return out


def _containers(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, rayStartParams, container) of a RayCluster spec."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g.get("rayStartParams", {}), c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_every_infra_file_parses() -> None:
    files = sorted(p for p in INFRA.rglob("*") if p.is_file())
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "Dockerfile", "runtime_env.yaml", "submit.sh", "ray/cluster.yaml", "k8s/raycluster.yaml",
        "k8s/rayjob-precompute.yaml", "k8s/rayjob-train.yaml", "mlflow/serve_local.sh", "mlflow/docker-compose.yml"}
    for path in files:
        if path.suffix in (".yaml", ".yml"):
            assert _docs(path), f"{path} is empty"
        elif path.suffix == ".sh":
            subprocess.run(["bash", "-n", str(path)], check=True)
            assert os.access(path, os.X_OK), f"{path} is not executable"
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE"}
    assert {instr for instr, _ in _dockerfile()} <= known


def test_dockerfile_cuda_base_project_installed_non_root() -> None:
    instrs = _dockerfile()
    args = dict(rest.split("=", 1) for instr, rest in instrs if instr == "ARG" and "=" in rest)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert [rest for instr, rest in instrs if instr == "FROM"] == ["${CUDA_IMAGE}"]
    for instr, rest in instrs:
        if instr == "COPY":
            for src in shlex.split(rest)[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert any(instr == "RUN" and "pip install" in rest and " . " in f"{rest} " for instr, rest in instrs)
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root user"
    assert any(instr == "ENV" and "RAY_AUTH_MODE=token" in rest for instr, rest in instrs)


def test_image_tags_and_versions_agree() -> None:
    tags = {}
    for path in [INFRA / "ray" / "cluster.yaml", *K8S, INFRA / "Dockerfile"]:
        for tag in IMAGE_RE.findall(path.read_text()):
            tags.setdefault(tag, []).append(path.name)
    assert len(tags) == 1, f"image tags disagree: {tags}"
    (tag,) = tags
    version = _pyproject()["project"]["version"]
    assert tag.startswith(f"{version}-"), f"image tag {tag} does not carry the project version {version}"
    args = dict(rest.split("=", 1) for instr, rest in _dockerfile() if instr == "ARG" and "=" in rest)
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)", args["CUDA_IMAGE"]).group(1)
    assert tag.endswith(f"cuda{cuda}"), f"tag {tag} vs base image CUDA {cuda}"
    assert args["TORCH_INDEX_URL"].endswith("cu" + cuda.replace(".", ""))
    ray_versions = {spec["rayVersion"] for _, spec in _ray_clusters()}
    assert ray_versions == {args["RAY_VERSION"]}
    assert _version(args["RAY_VERSION"]) >= _floor(_ray_requirement())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _floor(requirement: str) -> tuple[int, ...]:
    return _version(re.search(r">=\s*([\d.]+)", requirement).group(1))


def _ray_requirement() -> str:
    return next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray["))


# Standard-library modules newer than every supported Python, with the release that added them.
STDLIB_SINCE = {"tomllib": (3, 11), "zoneinfo": (3, 9), "graphlib": (3, 9)}
# Ray features the project relies on, with the release that introduced them (Ray's docs).
RAY_FEATURES_SINCE = {"token authentication (RAY_AUTH_MODE=token, ray get-auth-token)": (2, 52),
                      "Ray Train V2 as the default TorchTrainer": (2, 51)}


def test_declared_floors_cover_what_is_relied_on() -> None:
    project = _pyproject()["project"]
    python_floor = _floor(project["requires-python"])
    for folder in ("platform", "pipelines", "jobs", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", path.read_text(), re.M))
            for module in imported & STDLIB_SINCE.keys():
                assert python_floor >= STDLIB_SINCE[module], \
                    f"{path.relative_to(REPO)} imports {module} but requires-python is {project['requires-python']}"
    ray_floor = _floor(_ray_requirement())
    for feature, since in RAY_FEATURES_SINCE.items():
        assert ray_floor >= since, f"{_ray_requirement()} admits a Ray without {feature} (Ray {since})"


def test_entrypoints_exist_and_use_the_shared_volume() -> None:
    entrypoints = [(p.name, d["spec"]["entrypoint"]) for p in K8S for d in _docs(p) if d.get("kind") == "RayJob"]
    assert {name for name, _ in entrypoints} == {"rayjob-precompute.yaml", "rayjob-train.yaml"}
    for name, entry in entrypoints:
        argv = shlex.split(entry)
        assert argv[0] == "python" and argv[1].startswith("jobs/"), entry
        if not (REPO / argv[1]).exists():
            pytest.skip(f"{argv[1]} is not in this checkout yet")
        paths = [a for a in argv[2:] if a.startswith("/")]
        assert paths and all(p.startswith("/mnt/shared/") for p in paths), f"{name}: {paths}"
    for _, spec in _ray_clusters():
        for _, _, container in _containers(spec):
            assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    cluster = _docs(INFRA / "ray" / "cluster.yaml")[0]
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    pvc = next(d for d in _docs(INFRA / "k8s" / "raycluster.yaml") if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_resources_are_consistent() -> None:
    for name, spec in _ray_clusters():
        gpus_total = 0
        for group, params, container in _containers(spec):
            res = container["resources"]
            assert res["requests"] == res["limits"], f"{name}/{group}: requests != limits (Ray sees the limits)"
            gpu = int(res["limits"].get("nvidia.com/gpu", 0))
            assert int(params.get("num-gpus", gpu)) == gpu, f"{name}/{group}: num-gpus vs nvidia.com/gpu"
            if group == "head":
                assert gpu == 0 and params.get("num-cpus") == "0", "the head runs no training"
        for g in spec["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            gpu = int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            gpus_total += g["maxReplicas"] * gpu
        if name == "rayjob-train.yaml":
            argv = shlex.split(_docs(INFRA / "k8s" / name)[0]["spec"]["entrypoint"])
            assert "--use-gpu" in argv and int(_flag(argv, "--num-workers")) == gpus_total
    cluster = _docs(INFRA / "ray" / "cluster.yaml")[0]
    gpus_per_instance = {"p4d.24xlarge": 8, "p5.48xlarge": 8, "g5.12xlarge": 4, "g6.xlarge": 1}
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    for node in types.values():
        gpus = gpus_per_instance.get(node["node_config"]["InstanceType"], 0)
        assert node["resources"].get("GPU", 0) == gpus
    assert cluster["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())


def test_no_public_binds_and_token_auth_everywhere() -> None:
    # Ray: dashboard on loopback (cluster launcher), ClusterIP services (KubeRay), token mode on.
    cluster = _docs(INFRA / "ray" / "cluster.yaml")[0]
    head_cmd = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    for name, spec in _ray_clusters():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: token auth is off"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", f"{name}: head exposed"
        assert "dashboard-host" not in spec["headGroupSpec"].get("rayStartParams", {})
    submit = (INFRA / "submit.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in submit
    # 0.0.0.0 appears only where a login is required and the Host header is checked.
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        if path.name == "docker-compose.yml":
            continue
        assert not re.search(r"(?<![\d.])0\.0\.0\.0(?![\d/])", path.read_text()), f"{path} binds 0.0.0.0"
        assert "0.0.0.0/0" not in path.read_text(), f"{path} opens a port to the internet"
    compose = _docs(INFRA / "mlflow" / "docker-compose.yml")[0]
    for name, service in compose["services"].items():
        command = " ".join(service.get("command", [])) if isinstance(service.get("command"), list) else str(
            service.get("command", ""))
        if "0.0.0.0" in command:
            assert "--app-name basic-auth" in command and "--allowed-hosts" in command, name
        for port in service.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${MLFLOW_PUBLISH_HOST:-127.0.0.1}:")), \
                f"{name} publishes {port} beyond loopback by default"
    assert "ports" not in compose["services"]["postgres"] and "ports" not in compose["services"]["minio"]
    mlflow_cmd = " ".join(compose["services"]["mlflow"]["command"])
    assert "postgresql://" in mlflow_cmd and "--artifacts-destination" in mlflow_cmd
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    serve = (INFRA / "mlflow" / "serve_local.sh").read_text()
    assert "--host 127.0.0.1" in serve and "sqlite:///" in serve


def test_runtime_env_ships_the_checkout_without_bulk() -> None:
    env = _docs(INFRA / "runtime_env.yaml")[0]
    assert env["working_dir"] == "."
    assert {".venv", ".git", "mlruns", "demo_output"} <= set(env["excludes"])
    assert not any(k.endswith(("PASSWORD", "TOKEN")) for k in env["env_vars"])


def _submit(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    full.update(HOME=str(home), **env)
    return subprocess.run(["bash", str(INFRA / "submit.sh"), *args], capture_output=True, text=True, env=full,
                          timeout=60)


def test_submit_sh_refuses_missing_job_and_missing_token(tmp_path) -> None:
    res = _submit(["--", "python", "jobs/no_such_job.py"], tmp_path, RAY_AUTH_TOKEN="x")
    assert res.returncode == 2 and "jobs/" in res.stderr
    res = _submit(["--", "python", "jobs/_bootstrap.py"], tmp_path)
    assert res.returncode == 2 and "no token" in res.stderr
    res = _submit(["python", "jobs/_bootstrap.py"], tmp_path)
    assert res.returncode == 2
    assert _submit(["--help"], tmp_path).returncode == 0


@pytest.mark.slow
def test_serve_local_sh_starts_a_loopback_mlflow_server(tmp_path) -> None:
    server = ServeLocal(tmp_path / "store")
    try:
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
        if listening:  # ss is optional; when present, the only listener is loopback
            assert all("127.0.0.1:" in line for line in listening.splitlines() if line.strip())
        assert (tmp_path / "store" / "mlflow.db").exists()
    finally:
        server.stop()
