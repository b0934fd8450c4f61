"""Static checks of the deployment files: the KubeRay manifests and the container image (infra/).

No cluster and no Docker: every YAML document under infra/kuberay/ is parsed and checked for what
the nightly index job depends on (GPU workers, token auth, the fixed entrypoint, a schedule that
cannot overlap itself, least-privilege RBAC) and for anything that looks like a literal
credential; the Dockerfile is checked line by line. Each checker returns a list of problems, and
the tests at the end feed it broken variants of the real files, so a checker that silently
stopped checking fails too.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
INFRA_README = ROOT / "infra" / "README.md"

ENTRYPOINT = "python pipelines/index_catalog.py --config configs/prod.yaml"
SERVE_IMPORT_PATH = "pipelines.serve_search:app_builder"
SERVE_PORT = 8000
METRICS_PORT = 8080
API_KEY_ENV = "BLIP_SEARCH_API_KEY"
ROLE_VERBS = {"create", "get", "delete"}
# Env var names that hold secrets: they may only come from a Secret (valueFrom / envFrom).
SECRET_ENV = re.compile(
    r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|SESSION_KEY|API_KEY|CREDENTIALS?)(?:_|$)",
    re.I,
)
# Things that look like a literal credential anywhere in a deployment file. A value starting with
# `$`, `<` or `{` is a reference or a placeholder, not a literal.
CREDENTIAL_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a literal aws_secret_access_key": re.compile(
        r"aws_secret_access_key[\"']?[ \t]*[:=][ \t]*[\"']?(?![$<{\"'\s])\S", re.I
    ),
    "a literal RAY_AUTH_TOKEN": re.compile(
        r"RAY_AUTH_TOKEN[\"']?[ \t]*[:=][ \t]*[\"']?(?![$<{\"'\s])\S"
    ),
    "RAY_AUTH_TOKEN with a literal value:": re.compile(
        r"name:[ \t]*[\"']?RAY_AUTH_TOKEN[\"']?[ \t]*\n[ \t]*value:"
    ),
    "a literal BLIP_SEARCH_API_KEY": re.compile(
        r"BLIP_SEARCH_API_KEY[\"']?[ \t]*[:=][ \t]*[\"']?(?![$<{\"'\s])\S"
    ),
    "BLIP_SEARCH_API_KEY with a literal value:": re.compile(
        r"name:[ \t]*[\"']?BLIP_SEARCH_API_KEY[\"']?[ \t]*\n[ \t]*value:"
    ),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


# ----------------------------------------------------------------------------------------------
# Loading


def manifest_files() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml"))


@functools.cache
def load_documents() -> list[tuple[str, dict]]:
    """Every non-empty YAML document under infra/kuberay/, as (file#index, document).

    Parsed once per session: treat the result as read-only (deep-copy before changing it).
    """
    docs = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def the(kind: str, docs: list[tuple[str, dict]] | None = None) -> dict:
    """The single document of `kind` (fails if there is none or more than one)."""
    found = [d for _, d in (docs or load_documents()) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under infra/kuberay, found {len(found)}"
    return found[0]


def ray_pin() -> str:
    """The Ray version CI installs (constraints/ci.txt)."""
    text = (ROOT / "constraints" / "ci.txt").read_text(encoding="utf-8")
    match = re.search(r"^ray==(\S+)$", text, re.M)
    assert match, "constraints/ci.txt pins no ray version"
    return match.group(1)


# ----------------------------------------------------------------------------------------------
# Checkers: each returns a list of problems (empty = fine)


def iter_pod_specs(node, where: str = ""):
    """Every pod spec (a mapping with a `containers` list) anywhere inside `node`."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from iter_pod_specs(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_pod_specs(value, f"{where}[{i}]")


def image_problems(where: str, image) -> list[str]:
    if not isinstance(image, str) or not image.strip():
        return [f"{where}: no image"]
    if "@sha256:" in image:
        return []
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return [f"{where}: image {image!r} has no tag (pin a version, never the implicit latest)"]
    if name.rsplit(":", 1)[1] == "latest":
        return [f"{where}: image {image!r} uses the latest tag"]
    return []


def env_problems(where: str, container: dict) -> list[str]:
    problems = []
    for entry in container.get("env") or []:
        name = entry.get("name", "")
        if SECRET_ENV.search(name) and "value" in entry:
            problems.append(f"{where}: env {name} has a literal value (use valueFrom.secretKeyRef)")
        if name == "RAY_AUTH_MODE" and entry.get("value") != "token":
            problems.append(f"{where}: RAY_AUTH_MODE is {entry.get('value')!r}, not 'token'")
    return problems


def container_problems(where: str, container: dict) -> list[str]:
    where = f"{where}[{container.get('name', '?')}]"
    problems = image_problems(where, container.get("image"))
    limits = (container.get("resources") or {}).get("limits") or {}
    for resource in ("cpu", "memory"):
        if resource not in limits:
            problems.append(f"{where}: no resources.limits.{resource}")
    return problems + env_problems(where, container)


def gpu_limit(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return float(str(limits.get("nvidia.com/gpu", 0)))


def ray_auth_problems(where: str, container: dict) -> list[str]:
    env = {e.get("name"): e for e in container.get("env") or []}
    problems = []
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE=token is not set")
    token = env.get("RAY_AUTH_TOKEN") or {}
    if not ((token.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name"):
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret (secretKeyRef)")
    return problems


def operator_auth_problems(where: str, spec: dict, containers: list[dict]) -> list[str]:
    """Token auth managed by KubeRay (`authOptions`, needed where the operator calls the
    dashboard itself, as for a RayService): the mode is token and no container sets the token by
    hand (the operator adds RAY_AUTH_MODE / RAY_AUTH_TOKEN from the Secret it creates)."""
    problems = []
    if ((spec.get("authOptions") or {}).get("mode")) != "token":
        problems.append(f"{where}: authOptions.mode is not 'token' (the Ray token auth)")
    for c in containers:
        for e in c.get("env") or []:
            if e.get("name") in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
                problems.append(
                    f"{where}[{c.get('name', '?')}]: {e['name']} set by hand; with authOptions the "
                    "operator sets it (the dashboard would refuse the operator otherwise)"
                )
    return problems


def metrics_export_problems(where: str, group: dict) -> list[str]:
    """A Ray pod group scraped on Ray's metrics export port: ``metrics-export-port`` 8080, the
    container port ``metrics`` on it, and the prometheus.io annotations pointing there (where the
    service's own ``ray_search_*`` series are too, docs/metrics.md)."""
    problems = []
    params = group.get("rayStartParams") or {}
    if str(params.get("metrics-export-port")) != str(METRICS_PORT):
        problems.append(f"{where}: rayStartParams metrics-export-port is not {METRICS_PORT}")
    container = _group_container(group) or {}
    if named_ports(container).get("metrics") != METRICS_PORT:
        problems.append(f"{where}: no container port 'metrics' {METRICS_PORT}")
    annotations = ((group.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    wanted = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }
    for key, value in wanted.items():
        if str(annotations.get(key)) != value:
            problems.append(
                f"{where}: annotation {key} is {annotations.get(key)!r}, not {value!r} "
                "(scrape Ray's metrics export port)"
            )
    return problems


def ray_cluster_problems(where: str, spec, operator_auth: bool = False) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: no Ray cluster spec"]
    problems = []
    head = spec.get("headGroupSpec") or {}
    head_containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or []
    if not head_containers:
        problems.append(f"{where}: no headGroupSpec with containers")
    params = head.get("rayStartParams") or {}
    if str(params.get("num-cpus")) != "0":
        problems.append(
            f'{where}: head rayStartParams num-cpus is not "0" (work belongs on workers)'
        )
    if params.get("dashboard-host") != "0.0.0.0":
        problems.append(f"{where}: head rayStartParams dashboard-host is not 0.0.0.0")
    for c in head_containers:
        if gpu_limit(c):
            problems.append(f"{where}: the head asks for nvidia.com/gpu; the head is CPU only")
    if head_containers and not operator_auth:
        problems += ray_auth_problems(f"{where}.head", head_containers[0])
    if head_containers:
        problems += metrics_export_problems(f"{where}.head", head)

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    gpu_groups = 0
    for group in groups:
        name = f"{where}.worker[{group.get('groupName', '?')}]"
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            problems.append(f"{name}: no containers")
            continue
        gpu_groups += gpu_limit(containers[0]) >= 1
        if not operator_auth:
            problems += ray_auth_problems(name, containers[0])
        problems += metrics_export_problems(name, group)
    if groups and not gpu_groups:
        problems.append(f"{where}: no worker group with a nvidia.com/gpu limit")
    if operator_auth:
        ray_containers = head_containers[:1] + [
            c
            for g in groups
            for c in (((g.get("template") or {}).get("spec") or {}).get("containers") or [])[:1]
        ]
        problems += operator_auth_problems(where, spec, ray_containers)
    return problems


def rayjob_problems(where: str, spec: dict) -> list[str]:
    problems = []
    entry = spec.get("entrypoint")
    if not isinstance(entry, str) or shlex.split(entry) != shlex.split(ENTRYPOINT):
        problems.append(f"{where}: entrypoint is {entry!r}, expected {ENTRYPOINT!r}")
    if "rayClusterSpec" in spec:
        problems += ray_cluster_problems(f"{where}.rayClusterSpec", spec["rayClusterSpec"])
    elif not spec.get("clusterSelector"):
        problems.append(f"{where}: neither rayClusterSpec nor clusterSelector")
    if spec.get("rayClusterSpec") and spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes is not true (GPUs would stay up)")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(f"{where}: submissionMode is {spec.get('submissionMode')!r}")
    deadline = spec.get("activeDeadlineSeconds")
    if not isinstance(deadline, int) or not 0 < deadline < 24 * 3600:
        problems.append(f"{where}: activeDeadlineSeconds {deadline!r} is not set below 24 h")
    if not isinstance(spec.get("backoffLimit"), int):
        problems.append(f"{where}: no backoffLimit")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append(f"{where}: no ttlSecondsAfterFinished")
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    for name in runtime_env.get("env_vars") or {}:
        if SECRET_ENV.search(name):
            problems.append(f"{where}: runtimeEnvYAML sets {name}: secrets never go in a RayJob")
    submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers")
    if submitter:  # our own submitter must carry the token (KubeRay's default one would not)
        problems += ray_auth_problems(f"{where}.submitterPodTemplate", submitter[0])
    return problems


def container_port(container: dict, port) -> int | None:
    """The number of a container port given by number or by name (None if the name is unknown)."""
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def named_ports(container: dict) -> dict:
    return {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}


def ray_start_resources(params: dict) -> dict:
    """Custom resources of a group's rayStartParams (KubeRay's '"{\\"name\\": n}"' form)."""
    raw = (params or {}).get("resources")
    if not raw:
        return {}
    raw = raw.strip()
    if raw.startswith('"') and raw.endswith('"'):
        raw = raw[1:-1].replace('\\"', '"')
    return json.loads(raw)


def serve_app_deployments(app: dict) -> dict[str, dict]:
    return {d.get("name"): d for d in app.get("deployments") or []}


def rayservice_problems(where: str, spec: dict) -> list[str]:
    """The search service: the Serve application, its placement on the worker groups, the
    probes, the metrics port and the API key (see rayservice-search.yaml)."""
    cluster = spec.get("rayClusterConfig")
    problems = ray_cluster_problems(f"{where}.rayClusterConfig", cluster, operator_auth=True)
    if not isinstance(cluster, dict):
        return problems
    try:
        serve_config = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    except yaml.YAMLError as e:
        return problems + [f"{where}: serveConfigV2 is not YAML ({e})"]
    apps = [a for a in serve_config.get("applications") or [] if a.get("name") == "search"]
    if len(apps) != 1:
        return problems + [f"{where}: serveConfigV2 has no single application named 'search'"]
    app = apps[0]
    if app.get("import_path") != SERVE_IMPORT_PATH:
        problems.append(f"{where}: import_path {app.get('import_path')!r} != {SERVE_IMPORT_PATH!r}")
    if app.get("route_prefix", "/") != "/":
        problems.append(f"{where}: route_prefix {app.get('route_prefix')!r} is not '/'")
    if not ((app.get("args") or {}).get("config")):
        problems.append(f"{where}: the application's args name no config file")
    if ((serve_config.get("http_options") or {}).get("port", SERVE_PORT)) != SERVE_PORT:
        problems.append(f"{where}: Serve's http_options.port is not {SERVE_PORT}")

    groups = cluster.get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if _group_gpu(g)]
    cpu_groups = [g for g in groups if not _group_gpu(g)]
    deployments = serve_app_deployments(app)
    model = (deployments.get("QueryModel") or {}).get("ray_actor_options") or {}
    ingress = (deployments.get("SearchIngress") or {}).get("ray_actor_options") or {}
    if model.get("num_gpus") != 1:
        problems.append(f"{where}: QueryModel does not ask for num_gpus: 1")
    if ingress.get("num_gpus", 0) != 0:
        problems.append(f"{where}: SearchIngress asks for a GPU")
    # The ingress must land on the CPU group: a custom resource that only CPU groups offer.
    wanted = set(ingress.get("resources") or {})
    offered_cpu = set().union(*(ray_start_resources(g.get("rayStartParams")) for g in cpu_groups))
    offered_gpu = set().union(*(ray_start_resources(g.get("rayStartParams")) for g in gpu_groups))
    if not wanted or not wanted <= offered_cpu or wanted & offered_gpu:
        problems.append(
            f"{where}: SearchIngress is not pinned to a CPU worker group by a custom resource"
        )

    head = _group_container(cluster.get("headGroupSpec") or {})
    for name, group in [("head", cluster.get("headGroupSpec") or {})] + [
        (f"worker[{g.get('groupName', '?')}]", g) for g in groups
    ]:
        container = _group_container(group)
        if container is None:
            continue
        # (the metrics export port of every group: ray_cluster_problems)
        if named_ports(container).get("serve") != SERVE_PORT:
            problems.append(f"{where}.{name}: no container port 'serve' {SERVE_PORT}")
        if name == "head":
            continue
        ready = (container.get("readinessProbe") or {}).get("httpGet") or {}
        if (
            ready.get("path") != "/healthz"
            or container_port(container, ready.get("port")) != SERVE_PORT
        ):
            problems.append(f"{where}.{name}: no readiness probe on GET /healthz, serve port")
        alive = json.dumps(container.get("livenessProbe") or {})
        if not container.get("livenessProbe") or "/healthz" in alive:
            problems.append(
                f"{where}.{name}: liveness probe missing or tied to the application's /healthz"
            )
    if head is not None and "/healthz" in json.dumps(
        [head.get("readinessProbe"), head.get("livenessProbe")]
    ):
        problems.append(
            f"{where}.head: a head probe on /healthz never passes (KubeRay deploys the app only "
            "once the head is Ready)"
        )
    # The API key comes from a Secret, into the containers that run the ingress.
    for g in cpu_groups:
        container = _group_container(g) or {}
        env = {e.get("name"): e for e in container.get("env") or []}
        ref = ((env.get(API_KEY_ENV) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if not ref.get("name") or not ref.get("key"):
            problems.append(
                f"{where}.worker[{g.get('groupName')}]: {API_KEY_ENV} is not from a secretKeyRef"
            )
    return problems


def _group_container(group: dict) -> dict | None:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    return containers[0] if containers else None


def _group_gpu(group: dict) -> bool:
    container = _group_container(group)
    return container is not None and gpu_limit(container) >= 1


def cronjob_problems(where: str, spec: dict) -> list[str]:
    problems = []
    schedule = spec.get("schedule")
    if not isinstance(schedule, str) or len(schedule.split()) != 5:
        problems.append(f"{where}: schedule {schedule!r} is not a 5-field cron expression")
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(
            f"{where}: concurrencyPolicy is {spec.get('concurrencyPolicy')!r}, not Forbid"
        )
    job = (spec.get("jobTemplate") or {}).get("spec") or {}
    if job.get("backoffLimit") != 0:
        problems.append(
            f"{where}: jobTemplate backoffLimit is not 0 (a retry would create a second RayJob)"
        )
    return problems


def role_problems(where: str, doc: dict) -> list[str]:
    rules = doc.get("rules") or []
    problems = [] if rules else [f"{where}: no rules"]
    for rule in rules:
        if rule.get("apiGroups") != ["ray.io"]:
            problems.append(f"{where}: rule apiGroups {rule.get('apiGroups')} is not ['ray.io']")
        if rule.get("resources") != ["rayjobs"]:
            problems.append(f"{where}: rule resources {rule.get('resources')} is not ['rayjobs']")
        verbs = set(rule.get("verbs") or [])
        if not verbs or not verbs <= ROLE_VERBS:
            problems.append(f"{where}: verbs {sorted(verbs)} go beyond {sorted(ROLE_VERBS)}")
    return problems


def podmonitor_problems(where: str, spec: dict) -> list[str]:
    """The optional PodMonitor scrapes the `metrics` port of the project's pods."""
    problems = []
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if labels.get("app.kubernetes.io/name") != "blip-catalog-search":
        problems.append(f"{where}: selector does not match app.kubernetes.io/name")
    endpoints = spec.get("podMetricsEndpoints") or []
    if [e.get("port") for e in endpoints] != ["metrics"]:
        problems.append(f"{where}: podMetricsEndpoints do not scrape port 'metrics' (only)")
    if any(e.get("path", "/metrics") != "/metrics" for e in endpoints):
        problems.append(f"{where}: podMetricsEndpoints path is not /metrics")
    return problems


def manifest_problems(where: str, doc) -> list[str]:
    """Everything wrong with one Kubernetes (or Kustomize) document."""
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    problems = [f"{where}: no {key}" for key in ("apiVersion", "kind") if not doc.get(key)]
    kind = doc.get("kind")
    if kind == "Kustomization":
        return problems
    meta = doc.get("metadata") or {}
    if not (meta.get("name") or meta.get("generateName")):
        problems.append(f"{where}: no metadata.name (or generateName)")
    if kind == "Secret":
        problems.append(f"{where}: a Secret in git; create it with kubectl (infra/README.md)")
    if kind in ("ClusterRole", "ClusterRoleBinding"):
        problems.append(f"{where}: {kind}: cluster-wide rights are not needed")
    for pod_where, pod in iter_pod_specs(doc.get("spec"), f"{where}.spec"):
        for container in (pod.get("initContainers") or []) + pod["containers"]:
            problems += container_problems(pod_where, container)
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        problems += ray_cluster_problems(f"{where}.spec", spec)
    elif kind == "RayJob":
        problems += rayjob_problems(f"{where}.spec", spec)
    elif kind == "RayService":
        problems += rayservice_problems(f"{where}.spec", spec)
    elif kind == "CronJob":
        problems += cronjob_problems(f"{where}.spec", spec)
    elif kind == "Role":
        problems += role_problems(where, doc)
    elif kind == "PodMonitor":
        problems += podmonitor_problems(f"{where}.spec", spec)
    return problems


def credential_problems(where: str, text: str) -> list[str]:
    return [
        f"{where}: line {text.count(chr(10), 0, m.start()) + 1} looks like {what}"
        for what, pattern in CREDENTIAL_PATTERNS.items()
        for m in pattern.finditer(text)
    ]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.strip().startswith("#"):  # comment lines, also inside a continued instruction
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_problems(text: str, root: Path = ROOT) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    froms = [args for ins, args in instructions if ins == "FROM"]
    if not froms:
        problems.append("Dockerfile: no FROM")
    for args in froms:
        image = [t for t in args.split() if not t.startswith("--")][0]
        problems += image_problems("Dockerfile FROM", image)
    for ins, args in instructions:
        if ins in ("ENV", "ARG") and re.search(
            r"\b(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN|HF_TOKEN)\b",
            args,
        ):
            problems.append(f"Dockerfile: {ins} {args!r} bakes a credential into the image")
        if ins not in ("COPY", "ADD"):
            continue
        tokens = args.split()
        if any(t.startswith("--from") for t in tokens):
            continue  # from another stage, not from the build context
        sources = [t for t in tokens if not t.startswith("--")][:-1]
        if not sources:
            problems.append(f"Dockerfile: {ins} {args!r} has no source")
        for source in sources:
            if source.rstrip("/") in (".", "", "*", "./*") or source == "./":
                problems.append(f"Dockerfile: {ins} {args!r} copies the whole build context")
            elif "://" in source:
                problems.append(f"Dockerfile: {ins} {args!r} fetches a URL")
            elif not (root / source).exists():
                problems.append(f"Dockerfile: {ins} source {source!r} does not exist in the repo")
    users = [args.split(":")[0] for ins, args in instructions if ins == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile: the image runs as root (end with USER ray)")
    return problems


# ----------------------------------------------------------------------------------------------
# The real files


@pytest.mark.parametrize(
    "where,doc", load_documents(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_document_is_complete_and_safe(where, doc):
    assert manifest_problems(where, doc) == []


def test_expected_manifests_are_there():
    docs = load_documents()
    kinds = sorted(d["kind"] for _, d in docs)
    for kind in ("RayCluster", "RayJob", "CronJob", "Role", "RoleBinding", "Kustomization"):
        assert kind in kinds, f"no {kind} under infra/kuberay ({kinds})"
    assert the("RayCluster", docs)["apiVersion"] == "ray.io/v1"
    assert the("RayJob", docs)["apiVersion"] == "ray.io/v1"
    assert the("CronJob", docs)["apiVersion"] == "batch/v1"


def test_rayjob_runs_the_index_job_with_the_prod_config():
    spec = the("RayJob")["spec"]
    assert shlex.split(spec["entrypoint"]) == shlex.split(ENTRYPOINT)
    assert (ROOT / "configs" / "prod.yaml").is_file()
    assert (ROOT / "pipelines").is_dir()
    # The relative paths resolve in the runtime env's working_dir: the project inside the image.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/app"
    assert "WORKDIR /home/ray/app" in DOCKERFILE.read_text(encoding="utf-8")


def test_nightly_runs_cannot_overlap():
    rayjob = the("RayJob")["spec"]
    cron = the("CronJob")["spec"]
    assert cron["schedule"] == "0 2 * * *" and cron["concurrencyPolicy"] == "Forbid"
    # The CronJob's pod lives at least as long as every attempt of its RayJob may run, so Forbid
    # covers the whole run; and the RayJob's own bound ends an orphan before the next schedule.
    bound = (rayjob["backoffLimit"] + 1) * rayjob["activeDeadlineSeconds"]
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] >= bound
    assert bound < 24 * 3600


def test_cluster_shapes_agree_with_each_other_and_with_ci():
    """The shared RayCluster and the nightly RayJob's cluster run the same image, Ray and env."""
    cluster = the("RayCluster")["spec"]
    job_cluster = the("RayJob")["spec"]["rayClusterSpec"]

    def ray_containers(spec):
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        return [(g["template"]["spec"], g["template"]["spec"]["containers"][0]) for g in groups]

    def shape(spec):
        return [
            (pod.get("serviceAccountName"), c["image"], c["env"], c.get("envFrom"))
            for pod, c in ray_containers(spec)
        ]

    assert shape(cluster) == shape(job_cluster)
    assert cluster["rayVersion"] == job_cluster["rayVersion"] == ray_pin()
    base = [
        a for i, a in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")) if i == "FROM"
    ]
    assert base[-1].startswith(f"rayproject/ray:{ray_pin()}-py311-gpu"), base


def test_kustomization_wires_the_cronjob_to_the_rayjob_manifest():
    docs = load_documents()
    kustomization = the("Kustomization", docs)
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource
    assert "rayjob-nightly-index.yaml" not in kustomization["resources"]  # created, never applied
    [generator] = kustomization["configMapGenerator"]
    key, _, source = generator["files"][0].partition("=")
    assert source == "rayjob-nightly-index.yaml" and (KUBERAY / source).is_file()

    pod = the("CronJob", docs)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == generator["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    path = next(i["path"] for i in volume["configMap"]["items"] if i["key"] == key)
    assert f"-f {mount['mountPath']}/{path}" in pod["containers"][0]["args"][0]

    # The scheduler's service account is the one bound to the RayJob-only Role.
    binding = the("RoleBinding", docs)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": the("Role", docs)["metadata"]["name"],
    }
    assert [s["name"] for s in binding["subjects"]] == [pod["serviceAccountName"]]
    # Every service account a pod uses is defined here.
    accounts = {d["metadata"]["name"] for _, d in docs if d["kind"] == "ServiceAccount"}
    used = {
        spec.get("serviceAccountName")
        for _, d in docs
        for _, spec in iter_pod_specs(d.get("spec"))
        if spec.get("serviceAccountName")
    }
    assert used <= accounts, used - accounts


def test_no_literal_credentials_in_deployment_files():
    files = manifest_files() + [DOCKERFILE, INFRA_README]
    problems = [
        p for f in files for p in credential_problems(f.name, f.read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_dockerfile_is_pinned_minimal_and_credential_free():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert dockerfile_problems(text) == []
    copied = {
        s.rstrip("/")
        for ins, args in dockerfile_instructions(text)
        if ins == "COPY"
        for s in [t for t in args.split() if not t.startswith("--")][:-1]
    }
    assert {"pyproject.toml", "constraints", "blip_ops", "pipelines", "configs"} <= copied
    # CUDA torch first, then the project at CI's versions without CI's CPU torch pin.
    assert re.search(r"^ARG TORCH_SPEC=", text, re.M)
    assert "constraints/ci.txt" in text and "'^(torch|" in text
    assert re.search(r"^\s*HF_HUB_OFFLINE=0\b", text, re.M)


def _rayservice() -> tuple[dict, dict, dict]:
    """The RayService, its parsed serveConfigV2 and its one application."""
    service = the("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [app] = config["applications"]
    return service, config, app


def test_rayservice_serve_config_is_valid_for_ray_and_our_app():
    from ray.serve.schema import ServeDeploySchema

    service, config, app = _rayservice()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    ServeDeploySchema.model_validate(config)  # Ray's own schema of a Serve config
    assert app["name"] == "search" and app["route_prefix"] == "/"
    assert config["http_options"]["port"] == SERVE_PORT

    # The import path resolves to our builder, which builds the app from the named config.
    module_name, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == SERVE_IMPORT_PATH
    module = importlib.import_module(module_name)
    builder = getattr(module, attr)
    assert callable(builder)
    # The config is the project's copy inside the image (its WORKDIR), and that file is in git.
    config_path = Path(app["args"]["config"])
    workdir = next(
        a
        for i, a in reversed(dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")))
        if i == "WORKDIR"
    )
    assert config_path.is_absolute() and config_path.is_relative_to(workdir), config_path
    relative = config_path.relative_to(workdir)
    assert (ROOT / relative).is_file(), relative
    assert relative.parts[0] in {
        s.rstrip("/")
        for i, a in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
        if i == "COPY"
        for s in [t for t in a.split() if not t.startswith("--")][:-1]
    }
    other_args = {k: v for k, v in app["args"].items() if k != "config"}
    assert builder({"config": str(ROOT / relative), **other_args}) is not None

    # Overrides name the app's real deployments, and agree with configs/prod.yaml's `serve:`.
    deployments = serve_app_deployments(app)
    from pipelines.search.deployments import QueryModel, SearchIngress

    assert set(deployments) == {QueryModel.name, SearchIngress.name}
    prod = yaml.safe_load((ROOT / relative).read_text(encoding="utf-8"))["serve"]
    model = deployments["QueryModel"]["ray_actor_options"]
    ingress = deployments["SearchIngress"]["ray_actor_options"]
    assert model["num_gpus"] == prod["model"]["num_gpus"] == 1
    assert model["num_cpus"] == prod["model"]["num_cpus"]
    assert ingress.get("num_gpus", 0) == prod["ingress"].get("num_gpus", 0) == 0
    assert ingress["num_cpus"] == prod["ingress"]["num_cpus"]
    assert prod["api_key_env"] == API_KEY_ENV


def test_rayservice_cluster_places_model_on_gpu_and_ingress_on_cpu():
    service, _, app = _rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_pin()
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if _group_gpu(g)]
    cpu = [g for g in groups.values() if not _group_gpu(g)]
    assert len(gpu) == 1 and len(cpu) == 1, sorted(groups)
    gpu_pod = gpu[0]["template"]["spec"]
    gpu_container = gpu_pod["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] in ("1", 1)
    assert gpu_pod["nodeSelector"] and any(
        t.get("key") == "nvidia.com/gpu" for t in gpu_pod["tolerations"]
    )
    assert gpu_limit(_group_container(cluster["headGroupSpec"])) == 0
    assert gpu_limit(_group_container(cpu[0])) == 0
    # Enough GPU pods for the model's replicas, enough ingress pods for one replica each.
    prod = yaml.safe_load((ROOT / "configs" / "prod.yaml").read_text(encoding="utf-8"))["serve"]
    assert gpu[0]["replicas"] * gpu_limit(gpu_container) >= prod["model"]["num_replicas"]
    ingress = serve_app_deployments(app)["SearchIngress"]
    assert ingress["max_replicas_per_node"] == 1
    assert cpu[0]["replicas"] >= prod["ingress"]["num_replicas"]
    assert set(ingress["ray_actor_options"]["resources"]) <= set(
        ray_start_resources(cpu[0]["rayStartParams"])
    )
    # Same identity, image and working directory as the other Ray pods.
    for group in [cluster["headGroupSpec"], *groups.values()]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "blip-ray"
        container = pod["containers"][0]
        assert container["image"] == "REGISTRY/blip-catalog-search:VERSION"
        assert container["workingDir"] == "/home/ray/app"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and env["ARROW_DEFAULT_MEMORY_POOL"] == "system"


def test_rayservice_health_metrics_and_api_key():
    service, _, _ = _rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        container = _group_container(group)
        assert named_ports(container)["metrics"] == METRICS_PORT
        assert named_ports(container)["serve"] == SERVE_PORT
        assert group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT)
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
    for group in cluster["workerGroupSpecs"]:
        container = _group_container(group)
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/healthz"
        assert container_port(container, probe["port"]) == SERVE_PORT
    [ingress] = [g for g in cluster["workerGroupSpecs"] if not _group_gpu(g)]
    [key] = [e for e in _group_container(ingress)["env"] if e["name"] == API_KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"] == {
        "name": "blip-search-api-key",
        "key": "key",
        "optional": True,
    }
    # Only the ingress reads the key; the other pods do not get it.
    for group in [
        cluster["headGroupSpec"],
        *[g for g in cluster["workerGroupSpecs"] if _group_gpu(g)],
    ]:
        assert API_KEY_ENV not in {e["name"] for e in _group_container(group)["env"]}
    # No literal credentials anywhere in the file, and it is part of `kubectl apply -k`.
    path = KUBERAY / "rayservice-search.yaml"
    assert credential_problems(path.name, path.read_text(encoding="utf-8")) == []
    assert "rayservice-search.yaml" in the("Kustomization")["resources"]


def _ray_cluster_specs() -> dict[str, dict]:
    return {
        "RayCluster": the("RayCluster")["spec"],
        "RayJob": the("RayJob")["spec"]["rayClusterSpec"],
        "RayService": the("RayService")["spec"]["rayClusterConfig"],
    }


def test_every_ray_pod_is_scraped_on_the_metrics_export_port():
    """Head and workers of every Ray cluster: Ray's metrics export port (where the service's
    ray_search_* series are, docs/metrics.md) as `metrics`, annotated for scraping; and the
    optional PodMonitor selects those pods on that port."""
    pod_labels = []
    for kind, spec in _ray_cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert metrics_export_problems(kind, group) == []
            pod_labels.append(group["template"]["metadata"]["labels"])
    monitor = the("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(selector.items() <= labels.items() for labels in pod_labels)
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # Optional (it needs the Prometheus Operator's CRDs): not part of `kubectl apply -k`.
    assert "podmonitor-ray.yaml" not in the("Kustomization")["resources"]
    readme = INFRA_README.read_text(encoding="utf-8")
    assert "podmonitor-ray.yaml" in readme and "docs/metrics.md" in readme


# ----------------------------------------------------------------------------------------------
# The checkers reject what they should (mutations of the real documents)


def _containers(spec):
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def _set_env(container, name, entry):
    container["env"] = [e for e in container["env"] if e["name"] != name] + [
        dict(name=name, **entry)
    ]


MUTATIONS = {
    # name: (kind, mutate(doc), a fragment of the expected problem)
    "wrong entrypoint": (
        "RayJob",
        lambda d: d["spec"].update(
            entrypoint="python pipelines/index_catalog.py --config configs/local.yaml"
        ),
        "entrypoint",
    ),
    "no GPU worker": (
        "RayJob",
        lambda d: _containers(d["spec"]["rayClusterSpec"])[1]["resources"]["limits"].pop(
            "nvidia.com/gpu"
        ),
        "nvidia.com/gpu",
    ),
    "GPU on the head": (
        "RayCluster",
        lambda d: _containers(d["spec"])[0]["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "head",
    ),
    "no worker groups": (
        "RayCluster",
        lambda d: d["spec"].update(workerGroupSpecs=[]),
        "workerGroupSpecs",
    ),
    "no limits": (
        "RayCluster",
        lambda d: _containers(d["spec"])[1]["resources"].pop("limits"),
        "limits",
    ),
    "latest image": (
        "RayJob",
        lambda d: _containers(d["spec"]["rayClusterSpec"])[0].update(image="rayproject/ray:latest"),
        "latest",
    ),
    "untagged image": (
        "CronJob",
        lambda d: _containers_cron(d).update(image="bitnami/kubectl"),
        "no tag",
    ),
    "no image": ("RayCluster", lambda d: _containers(d["spec"])[0].pop("image"), "no image"),
    "literal Ray token": (
        "RayCluster",
        lambda d: _set_env(_containers(d["spec"])[1], "RAY_AUTH_TOKEN", {"value": "s3cr3t"}),
        "literal value",
    ),
    "auth disabled": (
        "RayJob",
        lambda d: _set_env(
            _containers(d["spec"]["rayClusterSpec"])[0], "RAY_AUTH_MODE", {"value": "disabled"}
        ),
        "RAY_AUTH_MODE",
    ),
    "submitter without token": (
        "RayJob",
        lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(env=[]),
        "submitterPodTemplate",
    ),
    "cluster kept after the job": (
        "RayJob",
        lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
        "shutdownAfterJobFinishes",
    ),
    "no deadline": (
        "RayJob",
        lambda d: d["spec"].pop("activeDeadlineSeconds"),
        "activeDeadlineSeconds",
    ),
    "secret in runtime env": (
        "RayJob",
        lambda d: d["spec"].update(runtimeEnvYAML="env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"),
        "runtimeEnvYAML",
    ),
    "head takes work": (
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
        "num-cpus",
    ),
    "no name": ("RayCluster", lambda d: d["metadata"].pop("name"), "metadata.name"),
    "worker not scraped": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["metadata"].pop("annotations"),
        "prometheus.io/scrape",
    ),
    "no metrics export port": (
        "RayJob",
        lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop(
            "metrics-export-port"
        ),
        "metrics-export-port",
    ),
    "podmonitor on the serve port": (
        "PodMonitor",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(port="serve"),
        "port 'metrics'",
    ),
    "concurrent nights": (
        "CronJob",
        lambda d: d["spec"].update(concurrencyPolicy="Allow"),
        "Forbid",
    ),
    "no schedule": ("CronJob", lambda d: d["spec"].pop("schedule"), "schedule"),
    "pod retries": (
        "CronJob",
        lambda d: d["spec"]["jobTemplate"]["spec"].update(backoffLimit=3),
        "backoffLimit",
    ),
    "wildcard verbs": ("Role", lambda d: d["rules"][0].update(verbs=["*"]), "verbs"),
    "list verb": ("Role", lambda d: d["rules"][0]["verbs"].append("list"), "verbs"),
    "secrets readable": ("Role", lambda d: d["rules"][0]["resources"].append("secrets"), "rayjobs"),
    "core API group": ("Role", lambda d: d["rules"][0].update(apiGroups=[""]), "ray.io"),
    "committed Secret": ("ServiceAccount", lambda d: d.update(kind="Secret"), "Secret"),
    "cluster-wide role": ("Role", lambda d: d.update(kind="ClusterRole"), "cluster-wide"),
}


def _serve_config(doc) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _set_serve_config(doc, mutate) -> None:
    config = _serve_config(doc)
    mutate(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _deployment(config, name) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def _service_group(doc, name) -> dict:
    groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


def _service_container(doc, name) -> dict:
    return _service_group(doc, name)["template"]["spec"]["containers"][0]


MUTATIONS.update(
    {
        "service: wrong import path": (
            "RayService",
            lambda d: _set_serve_config(
                d, lambda c: c["applications"][0].update(import_path="pipelines.serve:app")
            ),
            "import_path",
        ),
        "service: serveConfigV2 not YAML": (
            "RayService",
            lambda d: d["spec"].update(serveConfigV2="applications: [unclosed"),
            "not YAML",
        ),
        "service: model without GPU": (
            "RayService",
            lambda d: _set_serve_config(
                d, lambda c: _deployment(c, "QueryModel")["ray_actor_options"].update(num_gpus=0)
            ),
            "num_gpus: 1",
        ),
        "service: ingress on GPU": (
            "RayService",
            lambda d: _set_serve_config(
                d,
                lambda c: _deployment(c, "SearchIngress")["ray_actor_options"].update(num_gpus=1),
            ),
            "SearchIngress asks for a GPU",
        ),
        "service: ingress not pinned": (
            "RayService",
            lambda d: _set_serve_config(
                d,
                lambda c: _deployment(c, "SearchIngress")["ray_actor_options"].pop("resources"),
            ),
            "not pinned",
        ),
        "service: no GPU group": (
            "RayService",
            lambda d: _service_container(d, "gpu")["resources"]["limits"].pop("nvidia.com/gpu"),
            "nvidia.com/gpu",
        ),
        "service: readiness not on /healthz": (
            "RayService",
            lambda d: _service_container(d, "ingress")["readinessProbe"]["httpGet"].update(
                path="/"
            ),
            "readiness",
        ),
        "service: readiness on the metrics port": (
            "RayService",
            lambda d: _service_container(d, "ingress")["readinessProbe"]["httpGet"].update(
                port="metrics"
            ),
            "readiness",
        ),
        "service: liveness on the app": (
            "RayService",
            lambda d: _service_container(d, "gpu").update(
                livenessProbe={"httpGet": {"path": "/healthz", "port": "serve"}}
            ),
            "liveness",
        ),
        "service: head probe on the app": (
            "RayService",
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0].update(readinessProbe={"httpGet": {"path": "/healthz", "port": "serve"}}),
            "head",
        ),
        "service: no metrics port": (
            "RayService",
            lambda d: _service_container(d, "ingress").update(
                ports=[
                    p for p in _service_container(d, "ingress")["ports"] if p["name"] != "metrics"
                ]
            ),
            "metrics",
        ),
        "service: scraped on the serve port": (
            "RayService",
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"][
                "annotations"
            ].update({"prometheus.io/port": str(SERVE_PORT)}),
            "prometheus.io/port",
        ),
        "service: API key literal": (
            "RayService",
            lambda d: _set_env(_service_container(d, "ingress"), API_KEY_ENV, {"value": "k3y"}),
            "literal value",
        ),
        "service: API key missing": (
            "RayService",
            lambda d: _service_container(d, "ingress").update(
                env=[e for e in _service_container(d, "ingress")["env"] if e["name"] != API_KEY_ENV]
            ),
            "secretKeyRef",
        ),
        "service: no token auth": (
            "RayService",
            lambda d: d["spec"]["rayClusterConfig"].pop("authOptions"),
            "authOptions",
        ),
        "service: token set by hand": (
            "RayService",
            lambda d: _set_env(
                _service_container(d, "gpu"),
                "RAY_AUTH_TOKEN",
                {"valueFrom": {"secretKeyRef": {"name": "blip-ray-auth", "key": "auth_token"}}},
            ),
            "by hand",
        ),
        "service: head takes work": (
            "RayService",
            lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].pop(
                "num-cpus"
            ),
            "num-cpus",
        ),
    }
)


def _containers_cron(doc):
    return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_manifest_checker_rejects(mutation):
    kind, mutate, expected = MUTATIONS[mutation]
    docs = [d for _, d in load_documents() if d.get("kind") == kind]
    assert docs, f"no {kind} to mutate"
    doc = copy.deepcopy(docs[0])
    assert manifest_problems(kind, doc) == []
    mutate(doc)
    problems = manifest_problems(kind, doc)
    assert any(expected in p for p in problems), problems


FAKE_KEY_ID = "AKIA" + "Q7" * 8  # built here so that no scanner sees a key-shaped literal
FAKE_SECRET = "wJalrXUtnFEMI" + "K7MDENG" * 4


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"aws_access_key_id = {FAKE_KEY_ID}", "AWS access key id"),
        (f"aws_secret_access_key: {FAKE_SECRET}", "aws_secret_access_key"),
        (f'AWS_SECRET_ACCESS_KEY="{FAKE_SECRET}"', "aws_secret_access_key"),
        ("export RAY_AUTH_TOKEN=3f9c1e0d", "literal RAY_AUTH_TOKEN"),
        ("env_vars:\n  RAY_AUTH_TOKEN: 3f9c1e0d\n", "literal RAY_AUTH_TOKEN"),
        ("- name: RAY_AUTH_TOKEN\n  value: 3f9c1e0d\n", "literal value:"),
        ("-----BEGIN RSA PRIVATE KEY-----", "private key"),
        ("export BLIP_SEARCH_API_KEY=s3cr3t-k3y", "literal BLIP_SEARCH_API_KEY"),
        ("- name: BLIP_SEARCH_API_KEY\n  value: s3cr3t\n", "BLIP_SEARCH_API_KEY with a literal"),
    ],
)
def test_credential_checker_rejects(text, expected):
    problems = credential_problems("snippet", text)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "text",
    [
        "--from-literal=AWS_SECRET_ACCESS_KEY='<AWS_SECRET_ACCESS_KEY>'",
        'export RAY_AUTH_TOKEN="$(kubectl get secret blip-ray-auth -o jsonpath=...)"',
        "- name: RAY_AUTH_TOKEN\n  valueFrom:\n    secretKeyRef: {name: blip-ray-auth, key: auth_token}\n",
        'export BLIP_SEARCH_API_KEY="$(kubectl get secret blip-search-api-key -o jsonpath=...)"',
    ],
)
def test_credential_checker_accepts_references(text):
    assert credential_problems("snippet", text) == []


def _dockerfile_with(replace_from: str | None = None, append: str = "") -> str:
    text = DOCKERFILE.read_text(encoding="utf-8")
    if replace_from is not None:
        text = re.sub(r"^FROM .*$", replace_from, text, count=1, flags=re.M)
    return text + append


@pytest.mark.parametrize(
    "text,expected",
    [
        (_dockerfile_with("FROM rayproject/ray:latest"), "latest"),
        (_dockerfile_with("FROM rayproject/ray"), "no tag"),
        (_dockerfile_with(append="COPY . .\n"), "whole build context"),
        (
            _dockerfile_with(append="COPY --chown=ray:users ./ /home/ray/app/\n"),
            "whole build context",
        ),
        (_dockerfile_with(append="ADD . /app\n"), "whole build context"),
        (_dockerfile_with(append="ENV AWS_SECRET_ACCESS_KEY=abc\n"), "credential"),
        (
            _dockerfile_with(append="ENV AWS_REGION=us-east-1 \\\n    AWS_ACCESS_KEY_ID=abc\n"),
            "credential",
        ),
        (_dockerfile_with(append="ARG RAY_AUTH_TOKEN\n"), "credential"),
        (_dockerfile_with(append="COPY secrets/ secrets/\n"), "does not exist"),
        (_dockerfile_with(append="USER root\n"), "root"),
    ],
)
def test_dockerfile_checker_rejects(text, expected):
    problems = dockerfile_problems(text)
    assert any(expected in p for p in problems), problems


def test_dockerfile_checker_accepts_a_digest_pin():
    pinned = "FROM rayproject/ray:2.60.0-py311-gpu@sha256:" + "0" * 64
    assert dockerfile_problems(_dockerfile_with(pinned)) == []
