"""The Helm chart: lint --strict, rendered with real Helm (embedded) for the default values, every
feature switched on, and the variants in between; every manifest validated against the
Kubernetes 1.30 and the newest schemas; the contract checked manifest by manifest; the TLS probe
run against a real TLS server."""

from __future__ import annotations

import asyncio
import base64
import datetime
import re
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm  # the test extra's helm-python-sdk: real Helm, embedded
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes_validate import utils as kube

CHART = Path(__file__).resolve().parents[2] / "helm" / "curvscope"
ALL_FEATURES = yaml.safe_load((CHART / "ci" / "all-features-values.yaml").read_text())
KUBE_VERSIONS = ("1.30", kube.latest_version())
# Custom resources: no schema in kubernetes-validate; checked field by field below.
CUSTOM_KINDS = {"ServiceMonitor"}
TLS_INLINE = {"tls": {"enabled": True, "cert": "CERT", "key": "KEY", "ca": "CA"}}
VARIANTS = {
    "default": {},
    "all-features": ALL_FEATURES,
    "cpu-no-persistence": {"gpu": {"enabled": False}, "persistence": {"enabled": False},
                           "headless": {"enabled": False}, "podDisruptionBudget": {"enabled": False},
                           "serviceAccount": {"create": False}, "server": {"metricsPort": 0}},
    "tls-inline-existing-tokens": {**TLS_INLINE, "auth": {"enabled": True, "existingSecret": "tokens"},
                                   "autoscaling": {"enabled": True, "maxReplicas": 1}},
}


def render(values: dict | None = None) -> dict[str, list[dict]]:
    """Rendered manifests by kind (NOTES.txt under "NOTES")."""
    chart = helm.Chart.load(CHART)
    by_kind: dict[str, list[dict]] = {}
    for path, text in chart.render(values or {}, name="cs", namespace="ml", is_install=True).items():
        if path.endswith("NOTES.txt"):
            by_kind["NOTES"] = [{"text": text}]
            continue
        for document in yaml.safe_load_all(text):
            if document:
                by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def one(manifests: dict[str, list[dict]], kind: str) -> dict:
    assert len(manifests.get(kind, [])) == 1, (kind, list(manifests))
    return manifests[kind][0]


def container(manifests: dict[str, list[dict]]) -> dict:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(manifests: dict[str, list[dict]]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container(manifests)["env"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(variant):
    for kube_version in (None, "v1.30.0"):
        report = helm.lint(CHART, VARIANTS[variant] or None, strict=True, kube_version=kube_version)
        assert report["errors"] == [] and report["messages"] == [], report


def test_icon_is_a_file_of_this_repository():
    metadata = yaml.safe_load((CHART / "Chart.yaml").read_text())
    # Served from the main branch of the repository the chart names as its home.
    prefix = metadata["home"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert metadata["icon"].startswith(prefix), metadata["icon"]
    icon = CHART.parents[1] / metadata["icon"].removeprefix(prefix)
    assert icon.suffix in (".svg", ".png") and icon.is_file(), icon


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_against_kubernetes_schemas(variant):
    manifests = render(VARIANTS[variant])
    checked = set()
    for kind, documents in manifests.items():
        if kind == "NOTES" or kind in CUSTOM_KINDS:
            continue
        for document in documents:
            for version in KUBE_VERSIONS:
                kube.validate(document, version, strict=True)
            checked.add(kind)
    assert {"Deployment", "Service"} <= checked


def test_validation_catches_a_misspelled_field():
    deployment = one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 1}}
    with pytest.raises(kube.ValidationError):
        kube.validate(deployment, "1.30", strict=True)


def test_default_release_is_one_gpu_pod_with_grpc_probes():
    manifests = render()
    assert set(manifests) == {"NOTES", "Deployment", "Service", "PersistentVolumeClaim",
                              "PodDisruptionBudget", "ServiceAccount"}
    assert len(manifests["Service"]) == 2
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    server = container(manifests)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert server["image"].endswith(":0.1.0-cu128")
    assert server["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert server["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert server["readinessProbe"]["grpc"] == {"port": 50051, "service": "curvscope.v1.Curvscope"}
    assert {port["name"]: port["containerPort"] for port in server["ports"]} == {"grpc": 50051, "metrics": 9090}
    env = env_of(manifests)
    assert env["CURVSCOPE_STORE"].startswith("/var/lib/curvscope/") and env["CURVSCOPE_DEVICE"] == "auto"
    # Graceful shutdown fits in the pod's grace period.
    assert pod["terminationGracePeriodSeconds"] > float(env["CURVSCOPE_SHUTDOWN_GRACE"])
    # RWO store: the old pod must go before the new one mounts it.
    assert one(manifests, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_security_context_is_non_root_read_only_with_writable_store_and_tmp():
    manifests = render()
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    security = container(manifests)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container(manifests)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "persistentVolumeClaim" in volumes[mounts["/var/lib/curvscope"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    claim = one(manifests, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == volumes["store"]["persistentVolumeClaim"]["claimName"]


def test_services_speak_grpc_and_headless_service_lists_pods():
    services = {service["metadata"]["name"]: service for service in render()["Service"]}
    main, headless = services["cs-curvscope"], services["cs-curvscope-headless"]
    assert {port["name"]: port.get("appProtocol") for port in main["spec"]["ports"]} == {"grpc": "grpc", "metrics": "http"}
    assert headless["spec"]["clusterIP"] == "None"
    assert [port["appProtocol"] for port in headless["spec"]["ports"]] == ["grpc"]
    pod_labels = one(render(), "Deployment")["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_all_features():
    manifests = render(ALL_FEATURES)
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    server = container(manifests)
    env = env_of(manifests)
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == ALL_FEATURES["nodeSelector"]
    assert pod["affinity"] == ALL_FEATURES["affinity"] and pod["priorityClassName"] == "gpu-inference"
    # Tokens: a Secret the pod mounts, holding the tokens one per line.
    secret = next(s for s in manifests["Secret"] if s["type"] == "Opaque")
    assert base64.b64decode(secret["data"]["tokens"]).decode().split() == ALL_FEATURES["auth"]["tokens"]
    auth_volume = next(v for v in pod["volumes"] if v["name"] == "auth")
    assert auth_volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert env["CURVSCOPE_TOKEN_FILE"] == "/etc/curvscope/auth/tokens"
    assert "checksum/tokens" in deployment["spec"]["template"]["metadata"]["annotations"]
    # TLS from an existing Secret, mutual: the server asks for client certificates.
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "curvscope-tls"
    assert env["CURVSCOPE_TLS_CLIENT_CA"] == "/etc/curvscope/tls/ca.crt"
    assert "grpc" not in server["readinessProbe"] and server["readinessProbe"]["exec"]["command"][0] == "python"
    assert env["CURVSCOPE_MODEL_ROOTS"] == "/models" and env["NCCL_DEBUG"] == "WARN"
    assert one(manifests, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    # Autoscaling on CPU and on the queue depth.
    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert {metric["type"] for metric in hpa["spec"]["metrics"]} == {"Resource", "Pods"}
    pods_metric = next(m for m in hpa["spec"]["metrics"] if m["type"] == "Pods")["pods"]
    assert pods_metric["metric"]["name"] == "curvscope_queue_depth"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_service_monitor_scrapes_the_metrics_port_of_the_service():
    manifests = render(ALL_FEATURES)
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = next(s for s in manifests["Service"] if s["spec"].get("clusterIP") != "None")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in port_names and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The headless Service carries the same labels: the monitor must not scrape it twice.
    headless = next(s for s in manifests["Service"] if s["spec"].get("clusterIP") == "None")
    assert "metrics" not in {port["name"] for port in headless["spec"]["ports"]}


def test_rendered_environment_is_what_the_server_parses(monkeypatch):
    from curvscope_service.config import build_parser, config_from_args

    helps = " ".join(action.help or "" for action in build_parser()._actions)
    known = set(re.findall(r"\((CURVSCOPE_[A-Z_]+)\)", helps))
    env = env_of(render(ALL_FEATURES))
    chart = {name for name in env if name.startswith("CURVSCOPE_")}
    assert chart <= known, chart - known
    # Every server setting is reachable from the chart (the host stays the image's [::]).
    assert known - chart <= {"CURVSCOPE_HOST"}, known - chart
    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = config_from_args([])
    assert (config.port, config.metrics_port, config.max_queue_depth) == (50051, 9090, 32)
    assert str(config.store) == "/var/lib/curvscope/store" and config.model_roots == [Path("/models")]
    assert str(config.tls_client_ca) == "/etc/curvscope/tls/ca.crt"
    assert str(config.token_file) == "/etc/curvscope/auth/tokens"


def test_cpu_variant_without_persistence():
    manifests = render(VARIANTS["cpu-no-persistence"])
    server = container(manifests)
    assert "nvidia.com/gpu" not in server["resources"].get("limits", {})
    assert server["image"].endswith(":0.1.0-cpu") and env_of(manifests)["CURVSCOPE_DEVICE"] == "cpu"
    assert env_of(manifests)["CURVSCOPE_METRICS_PORT"] == "0"
    assert [port["name"] for port in server["ports"]] == ["grpc"]
    assert set(manifests) == {"NOTES", "Deployment", "Service"}
    assert "WARNING: persistence is off" in manifests["NOTES"][0]["text"]


def test_chart_written_tls_secret():
    manifests = render(VARIANTS["tls-inline-existing-tokens"])
    secret = one(manifests, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert {key: base64.b64decode(value).decode() for key, value in secret["data"].items()} == {
        "tls.crt": "CERT", "tls.key": "KEY", "ca.crt": "CA"}
    assert "CURVSCOPE_TLS_CLIENT_CA" not in env_of(manifests)
    volumes = one(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "auth")["secret"]["secretName"] == "tokens"


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 2}, "ReadWriteMany"),
    ({"autoscaling": {"enabled": True, "maxReplicas": 3}}, "ReadWriteMany"),
    ({"tls": {"enabled": True}}, "tls.existingSecret"),
    ({"auth": {"enabled": True}}, "auth.tokens"),
    ({"metrics": {"serviceMonitor": {"enabled": True}}, "server": {"metricsPort": 0}}, "metricsPort"),
    ({"autoscaling": {"enabled": True, "maxReplicas": 1, "targetCPUUtilizationPercentage": 0}}, "queueDepth"),
])
def test_inconsistent_values_fail_with_a_message(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"server": {"device": "tpu"}}, "/server/device"),
    ({"gpu": {"cuont": 2}}, "cuont"),
    ({"auth": {"enabled": True, "tokens": ["short"]}}, "/auth/tokens/0"),
])
def test_schema_rejects_bad_values(values, where):
    with pytest.raises(helm.HelmError, match=where):
        helm.Chart.load(CHART).validate_schema(values)


def _self_signed(directory: Path, name: str) -> None:
    """tls.crt, tls.key and ca.crt (the same self-signed certificate) for ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .sign(key, hashes.SHA256()))
    (directory / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    shutil.copy(directory / "tls.crt", directory / "ca.crt")


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_probe_checks_a_real_tls_server(tmp_path, mutual):
    from curvscope_service.config import ServerConfig
    from curvscope_service.in_process import InProcessServer

    _self_signed(tmp_path, "cs-curvscope.ml.svc")
    manifests = render({"tls": {"enabled": True, "existingSecret": "tls", "mutual": mutual}})
    probes = {kind: container(manifests)[kind]["exec"]["command"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"][-2:] == ["curvscope.v1.Curvscope", "cs-curvscope.ml.svc"]
    assert probes["livenessProbe"][-2:] == ["", "cs-curvscope.ml.svc"]
    config = ServerConfig(store=tmp_path / "store", tls_cert=tmp_path / "tls.crt", tls_key=tmp_path / "tls.key",
                          tls_client_ca=tmp_path / "ca.crt" if mutual else None)
    with InProcessServer(config) as server:
        def probe(command: list[str], server_name: str | None = None) -> int:
            _, flag, script, service, name = command
            script = script.replace("/etc/curvscope/tls/", f"{tmp_path}/").replace(
                "localhost:50051", f"localhost:{server.running.port}")
            return subprocess.run([sys.executable, flag, script, service, server_name or name],
                                  capture_output=True, timeout=60).returncode

        assert probe(probes["readinessProbe"]) == 0
        assert probe(probes["livenessProbe"]) == 0
        assert probe(probes["readinessProbe"], "someone-else.example") != 0
        asyncio.run_coroutine_threadsafe(server.running.health.enter_graceful_shutdown(), server._loop).result()
        assert probe(probes["readinessProbe"]) != 0  # NOT_SERVING while draining
