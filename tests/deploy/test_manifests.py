"""deploy/ checked offline: Kubernetes overlays, compose file, Dockerfile, health probe, gateway image.

- Every kustomize overlay renders with `kubectl kustomize` (Debian's kubectl 1.20, whose kustomize
  is v2.0, up to current ones) and every rendered object passes `kubernetes-validate` (strict: no
  unknown fields) for the oldest Kubernetes the manifests target (1.27: native gRPC probes are GA)
  and the newest the validator knows.
- What the schemas cannot see: headless Services behind the gateway's `dns:///` targets, gRPC probes
  on the right ports, GPU requests that match `--device`, an HPA and a PDB per service, termination
  grace longer than each process's own `--grace-seconds` (read by the services' real flag parsers
  from the rendered ConfigMaps), non-root and read-only containers, Secrets never rendered in prod.
- What a real cluster needs: no `replicas` where an HPA owns the count; a model volume that binds
  (pre-provisioned PersistentVolume, `storageClassName: ""`) and a Job that fills it, mounted
  read-only by the model pods; NetworkPolicies evaluated flow by flow against the listed flows; a
  drain that covers the longest generation the gateway accepts (gateway.config.MAX_NEW_TOKENS at
  MIN_DECODE_TOKENS_PER_S); hard anti-affinity and GPU node affinity in prod; rollout deadlines
  beyond the startup budget; the `restricted` Pod Security Standard; ephemeral-storage requests; the
  PodMonitor; files named in comments and docs exist.
- compose.yaml: GPU pinning (encoder GPU 0, decoder GPU 1), two Redis (sessions: noeviction + AOF on a
  volume; features: bounded LRU), the API key from a compose secret file, health checks, start order.
- Two Redis stores everywhere (see "two Redis stores" below), no Secret value on a command line.
- The gateway image's requirement list is enough for `python -m gateway` with torch & co. absent.

kubectl missing makes these tests fail (never skip); `KUBECTL=/path/to/kubectl` picks another one.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib.metadata
import io
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from packaging.requirements import Requirement

from gateway.config import MIN_DECODE_TOKENS_PER_S
from services.common.server import LIVENESS_SERVICE

try:
    import kubernetes_validate
except ImportError:  # a collection error that says what to do, not a skip
    pytest.fail("kubernetes-validate is not installed: `pip install kubernetes-validate` (it is in the dev "
                "extras: `make setup`)", pytrace=False)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# Everything `kubectl apply -k` takes: the overlays and the model volume for the prod ones.
KUSTOMIZATIONS = {**{name: K8S / "overlays" / name for name in OVERLAYS}, "models": K8S / "models"}
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
GPU = "nvidia.com/gpu"

# Each service: its Deployment (and Service, HPA, PDB) name, container name, gRPC port, config module.
SERVICES = {
    "encoder": ("internvl-encoder", 50052),
    "decoder": ("internvl-decoder", 50053),
    "gateway": ("internvl-gateway", 50051),
}
HPA_METRICS = {  # the load signal each side scales on
    "encoder": {("Pods", "ivl_encoder_queued_tiles")},
    "decoder": {("Pods", "ivl_decoder_active_sequences"), ("Pods", "ivl_decoder_kv_cache_usage_ratio")},
    "gateway": {("Resource", "cpu")},
}
# The plaintext port of the encoder and decoder that answers health checks only (their gRPC port takes
# mutual TLS, which the kubelet's native gRPC probes cannot speak); the gateway is probed on its own port.
HEALTH_PORTS = {"encoder": 50062, "decoder": 50063, "gateway": 50051}
# Env vars naming files read at start are not handed to the parsers here (the files do not exist);
# TLS paths are (they are only read when serving), so the parsers see the manifests' TLS settings.
_FILE_ENV = re.compile(r"_FILE$")


# ------------------------------------------------------------------------------------------ helpers


def kubectl() -> str:
    path = os.environ.get("KUBECTL") or shutil.which("kubectl") or "/usr/bin/kubectl"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            f"kubectl not found (looked at {'KUBECTL=' + path if os.environ.get('KUBECTL') else 'PATH and ' + path}):"
            " the deploy tests render the kustomize overlays with it. Install it (`make setup` does:"
            " `apt-get install -y kubernetes-client` on Debian) or set KUBECTL=/path/to/kubectl",
            pytrace=False,
        )
    return path


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """The objects of one of KUSTOMIZATIONS (an overlay's name, or "models")."""
    path = KUSTOMIZATIONS[overlay]
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"`kubectl kustomize {path.relative_to(REPO)}` failed ({proc.returncode}):\n{proc.stderr}",
                    pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def find(objects: tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: tuple[dict, ...], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workloads(objects: tuple[dict, ...]) -> list[dict]:
    """Everything that runs pods."""
    return find(objects, "Deployment") + find(objects, "StatefulSet") + find(objects, "Job")


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def main_container(objects: tuple[dict, ...], service: str) -> dict:
    deployment = one(objects, "Deployment", SERVICES[service][0])
    containers = {c["name"]: c for c in pod_spec(deployment)["containers"]}
    assert service in containers, f"{deployment['metadata']['name']} has no container named {service}"
    return containers[service]


def container_env(objects: tuple[dict, ...], container: dict) -> dict[str, Any]:
    """The container's environment: ConfigMaps from envFrom, then env (a valueFrom stays a dict)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"envFrom only from ConfigMaps here, got {source}"
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


def plain_env(env: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env.items() if isinstance(v, str) and not _FILE_ENV.search(k)}


# The services' own flag parsers: settings in the manifests must mean what they say.


def config_class(service: str) -> Any:
    if service == "encoder":
        from services.vision_encoder.config import EncoderConfig

        return EncoderConfig
    if service == "decoder":
        from services.language_decoder.config import DecoderConfig

        return DecoderConfig
    from gateway.config import GatewayConfig

    return GatewayConfig


CONFIG_SOURCES = {
    "encoder": "services/vision_encoder/config.py",
    "decoder": "services/language_decoder/config.py",
    "gateway": "gateway/config.py",
}


def parse_config(service: str, env: dict[str, Any]) -> Any:
    # The API keys file is left out (it does not exist here), so the gateway gets a key from the
    # environment (not --insecure-open: the manifests bind 0.0.0.0, which an open gateway refuses).
    argv = [] if service == "gateway" else ["--model", env.get("IVL_MODEL", "m")]
    extra = {"IVL_GATEWAY_API_KEYS": "manifest-check:not-a-real-key"} if service == "gateway" else {}
    try:
        return config_class(service).from_args(argv, env={**plain_env(env), **extra})
    except SystemExit:
        pytest.fail(f"the {service}'s flag parser rejected the manifest's settings {plain_env(env)}", pytrace=False)


@functools.cache
def known_env_names(service: str) -> frozenset[str]:
    """Env vars the service reads: `(env NAME)` in its --help, and quoted names in its config source."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        config_class(service).from_args(["--help"], env={})
    text = out.getvalue() + (REPO / CONFIG_SOURCES[service]).read_text()
    return frozenset(re.findall(r"\b(IVL_[A-Z0-9_]+)\b", text))


def redis_bytes(size: str) -> int:
    """Redis's units: 1k = 1000, 1kb = 1024 (likewise m, mb, g, gb)."""
    match = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", size.lower())
    assert match, f"not a Redis memory size: {size!r}"
    number, unit = int(match.group(1)), match.group(2) or ""
    return number * {"": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}[unit]


def kubernetes_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    assert match, f"unexpected memory quantity {quantity!r}"
    units = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(match.group(1)) * units[match.group(2) or ""]


def grace_seconds(service: str, config: Any) -> float:
    return config.server.grace_seconds if service == "gateway" else config.grace_seconds


def prestop_sleep(container: dict) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


# ------------------------------------------------------------------------------------------ kubernetes


def test_overlays_present():
    assert {"dev", "prod", "prod-managed-redis"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_overlay_renders_and_validates(overlay: str):
    objects = render(overlay)
    assert objects, f"{overlay} rendered nothing"
    errors = []
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{name} (Kubernetes {version}): {exc.message} at {'/'.join(map(str, exc.path))}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
                errors.append(f"{name} (Kubernetes {version}): no schema: {exc}")
    assert not errors, "\n".join(errors)


def test_validator_rejects_what_it_should():
    """The schema check is real: an unknown field and a named gRPC probe port are errors."""
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i", "readinessProbe": {"grpc": {"port": 1}}}]}}},
    }
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    del container["imagePullPolcy"]
    container["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_balance_client_side(overlay: str):
    """Encoder and decoder Services are headless; the gateway reaches them as dns:/// names."""
    objects = render(overlay)
    gateway_env = container_env(objects, main_container(objects, "gateway"))
    for service, env_name in (("encoder", "IVL_ENCODER_TARGET"), ("decoder", "IVL_DECODER_TARGET")):
        name, port = SERVICES[service]
        svc = one(objects, "Service", name)
        assert svc["spec"].get("clusterIP") == "None", f"{name} must be headless (clusterIP: None)"
        assert not svc["spec"].get("publishNotReadyAddresses"), f"{name}: only ready pods may get calls"
        target = gateway_env.get(env_name, "")
        match = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", target)
        assert match, f"gateway {env_name}={target!r} must be dns:///<service>:<port>"
        host, target_port = match.group(1), int(match.group(2))
        assert host.split(".")[0] == name, f"{env_name} names {host}, not the headless Service {name}"
        assert target_port == port and port in [p["port"] for p in svc["spec"]["ports"]]
    gateway_svc = one(objects, "Service", SERVICES["gateway"][0])
    assert gateway_svc["spec"].get("clusterIP") != "None", "the gateway's own Service is an ordinary one"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hpa_pdb_per_service(overlay: str):
    objects = render(overlay)
    for service, (name, port) in SERVICES.items():
        deployment = one(objects, "Deployment", name)
        container = main_container(objects, service)
        assert {"containerPort": port, "name": "grpc"} in container["ports"]
        health_port = HEALTH_PORTS[service]
        if health_port != port:
            assert {"containerPort": health_port, "name": "health"} in container["ports"]
            assert int(container_env(objects, container)[f"IVL_{service.upper()}_HEALTH_PORT"]) == health_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container.get(probe, {}).get("grpc", {}).get("port") == health_port, \
                f"{name}: {probe} must be a native gRPC probe on port {health_port}"
        # Liveness must not restart a pod that is loading, draining or waiting out its engine's recovery.
        assert container["livenessProbe"]["grpc"].get("service") == LIVENESS_SERVICE, \
            f"{name}: the liveness probe asks for health name {LIVENESS_SERVICE!r}"
        assert container["readinessProbe"]["grpc"].get("service", "") == "", f"{name}: readiness asks for \"\""
        startup = container["startupProbe"]
        if service != "gateway":  # model load: minutes, more for a Hub download
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, f"{name}: startupProbe too short"

        hpa = one(objects, "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = {(m["type"], m["pods"]["metric"]["name"] if m["type"] == "Pods" else m["resource"]["name"])
                   for m in hpa["spec"]["metrics"]}
        assert metrics == HPA_METRICS[service], f"{name}: HPA metrics {metrics}"

        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in find(objects, "PodDisruptionBudget")
                if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(pdbs) == 1, f"{name}: expected one PodDisruptionBudget selecting its pods"
        pdb = pdbs[0]["spec"]
        # maxUnavailable, not minAvailable: a single replica must not block node drains forever.
        assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb


def test_hpa_metrics_are_published():
    """Each Pods metric an HPA reads is a gauge the services export and prometheus-adapter publishes."""
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    published = {re.match(r"\s*'?([a-z_]+)", rule["seriesQuery"]).group(1) for rule in values["rules"]["custom"]}
    exported = set(re.findall(r'"(ivl_[a-z_]+)"', (REPO / "services" / "common" / "metrics.py").read_text()))
    wanted = {name for metrics in HPA_METRICS.values() for kind, name in metrics if kind == "Pods"}
    assert wanted <= published, f"not published by prometheus-adapter: {sorted(wanted - published)}"
    assert wanted <= exported, f"not exported by the services: {sorted(wanted - exported)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_match_devices(overlay: str):
    """A model service asks for one GPU exactly when it runs on CUDA; the gateway never does."""
    objects = render(overlay)
    for service in ("encoder", "decoder"):
        container = main_container(objects, service)
        config = parse_config(service, container_env(objects, container))
        resources = container.get("resources", {})
        gpus = resources.get("limits", {}).get(GPU)
        assert resources.get("requests", {}).get(GPU, gpus) == gpus, f"{service}: GPU request != limit"
        if config.device.startswith("cuda"):
            assert gpus == 1, f"{service} runs on {config.device} but asks for {gpus} GPUs"
        else:
            assert gpus is None, f"{service} runs on {config.device} but asks for GPUs"
        if overlay.startswith("prod"):
            assert config.device.startswith("cuda") and config.dtype == "bf16"
    gateway = main_container(objects, "gateway")
    assert GPU not in str(gateway.get("resources")), "the gateway is torch-free: no GPU"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_parse_and_grace_covers_drain(overlay: str):
    """The services' own parsers accept every setting; pods get more time than their drain."""
    objects = render(overlay)
    for service, (name, _) in SERVICES.items():
        container = main_container(objects, service)
        env = container_env(objects, container)
        unknown = {k for k in env if k.startswith("IVL_")} - known_env_names(service) - {"IVL_MODEL"}
        assert not unknown, f"{name}: env vars the {service} does not read: {sorted(unknown)}"
        config = parse_config(service, env)
        grace = grace_seconds(service, config)
        grace_vars = [k for k in env if "GRACE" in k]
        assert grace_vars and float(env[grace_vars[0]]) == grace, \
            f"{name}: the grace period set in the manifest ({grace_vars}) is not the one the {service} uses"
        pod = pod_spec(one(objects, "Deployment", name))
        needed = grace + prestop_sleep(container)
        assert pod["terminationGracePeriodSeconds"] > needed, \
            f"{name}: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} <= preStop + {grace}s"
    # The decoder and the gateway relay whole generations: their drain is the longest.
    decoder, gateway = (grace_seconds(s, parse_config(s, container_env(objects, main_container(objects, s))))
                        for s in ("decoder", "gateway"))
    assert decoder >= 120 and gateway >= decoder


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_pods_locked_down(overlay: str):
    objects = render(overlay)
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        assert pod["securityContext"].get("runAsNonRoot") is True, name
        assert pod["securityContext"].get("runAsUser", 0) != 0, name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            requests = c.get("resources", {}).get("requests", {})
            assert "cpu" in requests and "memory" in requests, f"{where}: resource requests"
            assert "memory" in c.get("resources", {}).get("limits", {}), f"{where}: memory limit"
        for volume in pod.get("volumes", []):
            sources = set(volume) - {"name"}
            assert len(sources) == 1, f"{name}: volume {volume['name']} has sources {sorted(sources)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_and_secrets(overlay: str):
    objects = render(overlay)
    gateway = main_container(objects, "gateway")
    env = container_env(objects, gateway)
    secret_names = {s["metadata"]["name"] for s in find(objects, "Secret")}
    for url_env in REDIS_URL_ENV.values():
        url = env.get(url_env)
        assert isinstance(url, dict) and "secretKeyRef" in url, f"{url_env} from a Secret (it may hold a password)"
    # The API keys: a Secret volume, and the gateway's key file inside it.
    keys_file = env["IVL_GATEWAY_API_KEYS_FILE"]
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment", "internvl-gateway"))["volumes"]}
    secret_volumes = [n for n in mounts if "secret" in volumes[n]]
    assert any(keys_file.startswith(mounts[n].rstrip("/") + "/") for n in secret_volumes), \
        f"IVL_GATEWAY_API_KEYS_FILE={keys_file} is not in a mounted Secret"
    if overlay.startswith("prod"):
        # Real keys are created out of band: an apply must never overwrite them with placeholders.
        assert not secret_names, f"{overlay} renders Secrets {secret_names}"
    else:
        keys_secret = one(objects, "Secret", volumes[secret_volumes[0]]["secret"]["secretName"])
        assert Path(keys_file).name in keys_secret.get("data", {})
        for url_env in REDIS_URL_ENV.values():
            assert env[url_env]["secretKeyRef"]["name"] in secret_names


# ------------------------------------------------------------------------------------------ two Redis stores

# Store -> (workload kind and name, the settings its Redis must run with). Other workers' NetworkPolicies
# select these pods by `app.kubernetes.io/name` and port 6379: both are pinned here.
REDIS_STORES = {
    "sessions": ("StatefulSet", "internvl-redis-sessions",
                 {"maxmemory-policy": "noeviction", "appendonly": "yes", "appendfsync": "everysec"}),
    "features": ("Deployment", "internvl-redis-features",
                 {"maxmemory-policy": "allkeys-lru", "appendonly": "no", "save": '""'}),
}
REDIS_URL_ENV = {"sessions": "IVL_SESSION_REDIS_URL", "features": "IVL_FEATURE_CACHE_URL"}
# Redis needs headroom beyond its data; the session store also forks to rewrite its append-only file.
REDIS_HEADROOM = {"sessions": 0.6, "features": 0.8}


def redis_directives(text: str) -> dict[str, str]:
    """`directive value` lines of a redis.conf (comments and blank lines skipped)."""
    lines = (ln.strip() for ln in text.splitlines())
    return dict(ln.split(None, 1) for ln in lines if ln and not ln.startswith("#"))


def redis_settings(objects: tuple[dict, ...], workload: dict) -> dict[str, str]:
    """What the Redis container runs with: its mounted config file, then the lines its entrypoint
    feeds on stdin (`redis-server FILE - <<EOF`), with the container's plain env values filled in."""
    pod = pod_spec(workload)
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    script = "\n".join(container.get("command", []) + container.get("args", []))
    match = re.search(r"exec redis-server (\S+) - <<EOF\n(.*?)\nEOF", script, re.S)
    assert match, f"{workload['metadata']['name']}: expected `exec redis-server FILE - <<EOF` (config on stdin)"
    conf_path, stdin = Path(match.group(1)), match.group(2)
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(conf_path.parent)]]
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    env = container_env(objects, container)
    stdin = re.sub(r"\$(\w+)", lambda m: env[m.group(1)] if isinstance(env[m.group(1)], str) else "<secret>", stdin)
    return {**redis_directives(config_map["data"][conf_path.name]), **redis_directives(stdin)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_two_redis_stores(overlay: str):
    """Sessions: a StatefulSet with a volume and a headless Service, noeviction + AOF every second;
    features: a Deployment and a Service, LRU, nothing persisted; each named, labelled and on 6379 as
    the NetworkPolicies expect. A managed-Redis overlay runs neither and still takes both URLs."""
    objects = render(overlay)
    gateway_env = container_env(objects, main_container(objects, "gateway"))
    assert "IVL_REDIS_URL" not in gateway_env, "one URL for both stores would share one eviction policy"
    assert not find(objects, "StatefulSet", "internvl-redis") and not find(objects, "Service", "internvl-redis")
    for store, (kind, name, wanted) in REDIS_STORES.items():
        assert REDIS_URL_ENV[store] in gateway_env
        if overlay == "prod-managed-redis":
            assert not find(objects, kind, name) and not find(objects, "Service", name), "managed Redis replaces it"
            continue
        workload = one(objects, kind, name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == name
        assert workload["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        container = pod_spec(workload)["containers"][0]
        assert {"containerPort": 6379, "name": "redis"} in container["ports"]
        settings = redis_settings(objects, workload)
        for directive, value in wanted.items():
            assert settings.get(directive) == value, f"{name}: {directive} {settings.get(directive)} != {value}"
        assert settings.get("requirepass") == "<secret>", f"{name}: password from the Secret, on stdin"
        maxmemory = redis_bytes(settings["maxmemory"])
        limit = kubernetes_bytes(container["resources"]["limits"]["memory"])
        assert 0 < maxmemory <= REDIS_HEADROOM[store] * limit, f"{name}: maxmemory {maxmemory} vs limit {limit}"
        service = one(objects, "Service", name)
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert [p["port"] for p in service["spec"]["ports"]] == [6379]
        if store == "sessions":
            assert service["spec"].get("clusterIP") == "None", f"{name}: a headless Service"
            assert workload["spec"]["serviceName"] == name
            claims = {c["metadata"]["name"]: c for c in workload["spec"].get("volumeClaimTemplates", [])}
            data = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert settings.get("dir") == "/data" and data.get(next(iter(claims), "")) == "/data", \
                f"{name}: the append-only file must live on the PersistentVolumeClaim"
            assert kubernetes_bytes(claims["data"]["spec"]["resources"]["requests"]["storage"]) >= 2 * maxmemory, \
                f"{name}: the volume holds an append-only file of up to twice the data"
            assert "startupProbe" in container, f"{name}: replaying the AOF must not trip the liveness probe"
    if overlay != "prod-managed-redis" and not overlay.startswith("prod"):
        # The in-overlay URLs reach the two Services (and the gateway's parser sees two instances).
        secret = one(objects, "Secret", gateway_env[REDIS_URL_ENV["sessions"]]["secretKeyRef"]["name"])
        urls = {store: base64.b64decode(secret["data"][gateway_env[env_name]["secretKeyRef"]["key"]]).decode()
                for store, env_name in REDIS_URL_ENV.items()}
        for store, url in urls.items():
            assert f"@{REDIS_STORES[store][1]}:6379/" in url, url
        from gateway.config import GatewayConfig

        config = GatewayConfig.from_args(["--insecure-open"], env={  # as the pod gets them: env from a Secret
            "IVL_SESSION_REDIS_URL": urls["sessions"], "IVL_FEATURE_CACHE_URL": urls["features"]})
        assert not config.stores_share_instance


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_on_a_command_line(overlay: str):
    """`$(VAR)` in command/args puts the value in the process's argv (visible in ps, /proc): never a
    Secret's value."""
    objects = render(overlay)
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet"):
        pod = pod_spec(workload)
        for c in pod["containers"] + pod.get("initContainers", []):
            secret_env = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            argv = " ".join(c.get("command", []) + c.get("args", []))
            used = set(re.findall(r"\$\((\w+)\)", argv)) & secret_env
            assert not used, f"{workload['metadata']['name']}/{c['name']}: Secret values on the command line: {used}"
            assert "--requirepass" not in argv


# ------------------------------------------------------------------------------------------ service-to-service trust

# The encoder and decoder trust their callers (the decoder caches the embeddings they send), so in every
# deployment we ship they take calls only over mutual TLS: a certificate of their own, and client
# certificates signed by the deployment's CA (the gateway's). docs/deploy.md states the boundary.
MODEL_SERVICES = ("encoder", "decoder")


def _secret_file(objects: tuple[dict, ...], workload: str, container: dict, path: str) -> str:
    """The Secret whose volume holds `path` in `container` (fails if none does)."""
    volumes = {v["name"]: v for v in pod_spec(one(objects, "Deployment", workload))["volumes"]}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/") and "secret" in volumes[mount["name"]]:
            return volumes[mount["name"]]["secret"]["secretName"]
    pytest.fail(f"{workload}: {path} is not in a mounted Secret", pytrace=False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_services_require_mutual_tls(overlay: str):
    objects = render(overlay)
    for service in MODEL_SERVICES:
        name = SERVICES[service][0]
        container = main_container(objects, service)
        config = parse_config(service, container_env(objects, container))
        assert config.tls_cert and config.tls_key and config.tls_ca, f"{name}: mutual TLS must be on"
        assert not config.allow_unauthenticated_peers, f"{name}: unauthenticated peers allowed"
        secrets = {_secret_file(objects, name, container, path) for path in (config.tls_cert, config.tls_key,
                                                                              config.tls_ca)}
        assert secrets == {f"{name}-tls"}, f"{name}: certificate, key and CA from its own Secret, got {secrets}"
    gateway = main_container(objects, "gateway")
    peer_tls = parse_config("gateway", container_env(objects, gateway)).peer_tls
    assert peer_tls is not None and peer_tls.ca and peer_tls.cert and peer_tls.key, \
        "the gateway must present a client certificate to the encoder and decoder"
    secrets = {_secret_file(objects, "internvl-gateway", gateway, path)
               for path in (peer_tls.ca, peer_tls.cert, peer_tls.key)}
    assert secrets == {"internvl-gateway-peer-tls"}
    # Created out of band from `make certs` output (docs/deploy.md), never rendered with a key in git.
    assert not {s["metadata"]["name"] for s in find(objects, "Secret")} & {
        "internvl-encoder-tls", "internvl-decoder-tls", "internvl-gateway-peer-tls"}


def test_compose_requires_mutual_tls(compose: dict):
    services = compose["services"]
    for service in MODEL_SERVICES:
        env = compose_env(services[service])
        prefix = f"IVL_{service.upper()}_"
        config = config_class(service).from_args(["--model", "m"], env=plain_env(env))
        assert config.host == "0.0.0.0" and config.tls_ca and not config.allow_unauthenticated_peers
        mounted = {f"/run/secrets/{s}" for s in services[service].get("secrets", [])}
        for flag in ("TLS_CERT", "TLS_KEY", "TLS_CA"):
            assert env[prefix + flag] in mounted, f"{service}: {prefix + flag} is not a mounted secret"
        assert int(env[prefix + "HEALTH_PORT"]) == HEALTH_PORTS[service]
        assert f"{SERVICES[service][1]}:" not in str(services[service].get("ports", [])), \
            f"{service}: its gRPC port is not published on the host"
    gateway = compose_env(services["gateway"])
    mounted = {f"/run/secrets/{s}" for s in services["gateway"].get("secrets", [])}
    for flag in ("CA", "CERT", "KEY"):
        assert gateway[f"IVL_GATEWAY_PEER_TLS_{flag}"] in mounted
    for name, secret in compose["secrets"].items():
        if name != "api_keys":
            assert _default(secret["file"]).startswith("./certs/") and not secret["file"].endswith("ca.key")


def test_make_certs_issues_what_the_manifests_mount(tmp_path):
    """`make certs` writes the files the compose secrets name; the services' certificates name the hosts
    the gateway dials (compose and Kubernetes Service names), and the keys are owner-only."""
    from cryptography import x509

    from services.tools.make_certs import main as make_certs

    compose_file = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    out = tmp_path / "certs"
    assert make_certs(["--out", str(out), "--namespace", "internvl"]) == 0
    for name, secret in compose_file["secrets"].items():
        if name != "api_keys":
            assert (out / Path(_default(secret["file"])).name).is_file(), name
    for service in MODEL_SERVICES:
        cert = x509.load_pem_x509_certificate((out / f"{service}.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        assert {service, SERVICES[service][0], f"{SERVICES[service][0]}.internvl.svc"} <= set(names)
        assert (out / f"{service}.key").stat().st_mode & 0o077 == 0
    assert make_certs(["--out", str(out)]) == 1, "an existing set is never overwritten"


# ------------------------------------------------------------------------------------------ issue 17: a real cluster


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_targets_have_no_replicas(overlay: str):
    """An HPA owns its workload's replica count: `replicas` in a manifest would reset it on every apply."""
    objects = render(overlay)
    hpas = find(objects, "HorizontalPodAutoscaler")
    assert hpas, f"{overlay}: no HorizontalPodAutoscaler"
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        workload = one(objects, target["kind"], target["name"])
        assert "replicas" not in workload["spec"], \
            f"{overlay}: {target['kind']} {target['name']} sets replicas, but HPA {hpa['metadata']['name']} owns it"


def startup_budget_s(container: dict) -> int:
    probe = container["startupProbe"]
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_deadline_covers_startup(overlay: str):
    """A rollout is not declared failed while its new pod is still inside its startup budget."""
    objects = render(overlay)
    for service, (name, _) in SERVICES.items():
        deployment = one(objects, "Deployment", name)
        deadline = deployment["spec"].get("progressDeadlineSeconds", 600)  # Kubernetes' default
        assert deadline >= startup_budget_s(main_container(objects, service)), \
            f"{name}: progressDeadlineSeconds {deadline} < its startup probe's budget"
    # The model pods: the 30-minute budget for loading weights from the base (prod keeps it).
    for service in ("encoder", "decoder"):
        assert startup_budget_s(main_container(render("prod"), service)) >= 1800


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_covers_longest_generation(overlay: str):
    """The longest generation the gateway accepts finishes within the decoder's and the gateway's drain
    at the decode rate the deployment is sized for; a request leaving max_new_tokens 0 gets no more."""
    objects = render(overlay)
    configs = {s: parse_config(s, container_env(objects, main_container(objects, s))) for s in SERVICES}
    longest_s = configs["gateway"].max_new_tokens / MIN_DECODE_TOKENS_PER_S
    assert configs["decoder"].default_max_new_tokens <= configs["gateway"].max_new_tokens
    for service in ("decoder", "gateway"):
        grace = grace_seconds(service, configs[service])
        assert grace >= longest_s, (f"{service}: drain {grace}s < {configs['gateway'].max_new_tokens} tokens at "
                                    f"{MIN_DECODE_TOKENS_PER_S} tokens/s = {longest_s:.0f}s")
        pod = pod_spec(one(objects, "Deployment", SERVICES[service][0]))
        assert pod["terminationGracePeriodSeconds"] > longest_s + prestop_sleep(main_container(objects, service))


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("prod")])
def test_prod_model_pods_one_per_gpu_node(overlay: str):
    """Hard anti-affinity per model service, and node affinity for the GPU each needs (docs: the decoder
    needs >= 40 GB)."""
    objects = render(overlay)
    for service in ("encoder", "decoder"):
        name = SERVICES[service][0]
        pod = pod_spec(one(objects, "Deployment", name))
        labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        anti = pod.get("affinity", {}).get("podAntiAffinity", {})
        anti = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        assert any(term["topologyKey"] == "kubernetes.io/hostname"
                   and term["labelSelector"]["matchLabels"].items() <= labels.items() for term in anti), \
            f"{name}: no required pod anti-affinity on kubernetes.io/hostname against its own pods"
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        expressions = {e["key"]: e for term in terms for e in term["matchExpressions"]}
        assert len(terms) == 1, f"{name}: one node selector term (terms are ORed)"
        if service == "decoder":
            memory = expressions.get("nvidia.com/gpu.memory")
            assert memory and memory["operator"] == "Gt" and int(memory["values"][0]) >= 38 * 1024, \
                f"{name}: must require a GPU of >= 40 GB (nvidia.com/gpu.memory, MiB)"
        else:
            assert expressions.get("nvidia.com/gpu.present", {}).get("values") == ["true"], name
        assert "topologySpreadConstraints" not in pod, f"{name}: the anti-affinity replaces the soft spread"


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_ephemeral_storage_requested(overlay: str):
    """Every container of ours says how much node disk it uses, and disk-backed emptyDirs are bounded."""
    objects = render(overlay)
    for workload in find(objects, "Deployment") + find(objects, "StatefulSet") + find(objects, "Job"):
        name = workload["metadata"]["name"]
        pod = pod_spec(workload)
        for c in pod["containers"] + pod.get("initContainers", []):
            resources, where = c.get("resources", {}), f"{name}/{c['name']}"
            assert "ephemeral-storage" in resources.get("requests", {}), f"{where}: ephemeral-storage request"
            assert "ephemeral-storage" in resources.get("limits", {}), f"{where}: ephemeral-storage limit"
        for volume in pod.get("volumes", []):
            empty = volume.get("emptyDir")
            if empty is not None and empty.get("medium") != "Memory" and volume["name"] != "models":
                assert "sizeLimit" in empty, f"{name}: emptyDir {volume['name']} has no sizeLimit"


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_problems(pod: dict) -> list[str]:
    """What breaks the Pod Security Standard `restricted` (the checks Pod Security Admission runs)."""
    problems = [f"{key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    problems += [f"volume {v['name']}: type {sorted(set(v) - {'name'})}" for v in pod.get("volumes", [])
                 if not set(v) - {"name"} <= RESTRICTED_VOLUME_TYPES]
    pod_sc = pod.get("securityContext", {})
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        where = c["name"]
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as uid 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile {seccomp}")
        if any("hostPort" in p for p in c.get("ports", [])):
            problems.append(f"{where}: hostPort")
    return problems


@pytest.mark.parametrize("overlay", KUSTOMIZATIONS)
def test_pod_security_restricted(overlay: str):
    """The namespace enforces the `restricted` Pod Security Standard, and every pod meets it."""
    objects = render(overlay)
    namespaces = find(objects, "Namespace")
    if overlay != "models":  # the model volume goes into the prod overlay's namespace
        assert len(namespaces) == 1, f"{overlay}: renders its Namespace"
        labels = namespaces[0]["metadata"].get("labels", {})
        for mode in ("enforce", "warn", "audit"):
            assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", \
                f"{overlay}: namespace label pod-security.kubernetes.io/{mode}=restricted"
    for workload in workloads(objects):
        problems = restricted_problems(pod_spec(workload))
        assert not problems, f"{workload['metadata']['name']} breaks the restricted profile: {problems}"


def test_restricted_check_rejects_what_it_should():
    pod = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
           "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_problems(pod) == []
    assert restricted_problems({**pod, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]})
    assert restricted_problems({**pod, "securityContext": {"runAsNonRoot": True}})


# The model volume: a pre-provisioned PersistentVolume bound by name, filled once by a Job.


def test_model_volume_binds_and_fills():
    from services.tools import fetch_model

    objects = render("models")
    pv, pvc = find(objects, "PersistentVolume"), find(objects, "PersistentVolumeClaim")
    assert len(pv) == 1 and len(pvc) == 1, "one PersistentVolume and its claim"
    pv, pvc = pv[0], pvc[0]
    # Bound statically: no StorageClass (a default one would provision an empty volume instead).
    assert pv["spec"]["storageClassName"] == "" and pvc["spec"]["storageClassName"] == ""
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert set(pvc["spec"]["accessModes"]) <= set(pv["spec"]["accessModes"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "the fill Job writes while many nodes mount it"
    assert kubernetes_bytes(pv["spec"]["capacity"]["storage"]) >= kubernetes_bytes(
        pvc["spec"]["resources"]["requests"]["storage"])
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    # The fill Job: writes through the claim, into the directory the prod pods load.
    job = one(objects, "Job", "internvl-models-fill")
    pod = pod_spec(job)
    volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                  == pvc["metadata"]["name"])
    assert not volume["persistentVolumeClaim"].get("readOnly")
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert not mount.get("readOnly"), "the fill Job must write the volume"
    command = container["command"]
    assert command[:3] == ["python", "-m", "services.tools.fetch_model"], command
    args = fetch_model.parse_args(command[3:])  # the tool accepts exactly these arguments
    prod = render("prod")
    assert pvc["metadata"]["namespace"] == one(prod, "Namespace", pvc["metadata"]["namespace"])["metadata"]["name"]
    prod_env = container_env(prod, main_container(prod, "decoder"))
    assert str(args.directory) == prod_env["IVL_MODEL"], "the Job fills the directory the prod pods load"
    assert str(args.directory).startswith(mount["mountPath"].rstrip("/") + "/")
    assert container["image"] == main_container(prod, "decoder")["image"], "the same image as overlays/prod"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.startswith("prod")])
def test_model_pods_mount_the_volume_read_only(overlay: str):
    claim = one(render("models"), "PersistentVolumeClaim", "internvl-models")["metadata"]["name"]
    objects = render(overlay)
    for service in ("encoder", "decoder"):
        pod = pod_spec(one(objects, "Deployment", SERVICES[service][0]))
        container = main_container(objects, service)
        volume = next(v for v in pod["volumes"] if v["name"] == "models")
        assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
        assert mount.get("readOnly") is True
        model = container_env(objects, container)["IVL_MODEL"]
        assert model.startswith(mount["mountPath"].rstrip("/") + "/"), f"IVL_MODEL={model} is not on the volume"


# NetworkPolicies: a small evaluator of the rendered policies (the Kubernetes semantics: a pod selected by
# a policy of a direction allows only what some such policy lists; a connection needs the source's egress
# and the destination's ingress), run over the pods of the namespace and typical peers outside it.


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str | None  # None: an address outside the cluster
    labels: tuple[tuple[str, str], ...] = ()
    ip: str = ""
    ports: tuple[tuple[int, str], ...] = ()  # what it listens on

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(rule_peer: dict, policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip) if peer.namespace is None else None
        return address is not None and address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", []))
    if peer.namespace is None:
        return False
    ns_selector, pod_selector = rule_peer.get("namespaceSelector"), rule_peer.get("podSelector")
    ns_ok = (_selects(ns_selector, {"kubernetes.io/metadata.name": peer.namespace}) if ns_selector is not None
             else peer.namespace == policy_namespace)
    return ns_ok and (pod_selector is None or _selects(pod_selector, peer.label_dict))


def _port_matches(rule_ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        assert "port" not in p or isinstance(p["port"], int), f"use port numbers in NetworkPolicies: {p}"
        if p.get("protocol", "TCP") == protocol and (
                "port" not in p or p["port"] <= port <= p.get("endPort", p["port"])):
            return True
    return False


def _allows(policies: list[dict], direction: str, subject: Peer, other: Peer, port: int, protocol: str) -> bool:
    """Does `subject` (the destination for Ingress, the source for Egress) let this connection through?"""
    if subject.namespace is None:
        return True  # outside the cluster: not ours to police
    selecting = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                 and direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], subject.label_dict)]
    if not selecting:
        return True
    peers_key = "from" if direction == "Ingress" else "to"
    return any(
        (rule.get(peers_key) is None or any(_peer_matches(x, p["metadata"]["namespace"], other)
                                            for x in rule[peers_key]))
        and _port_matches(rule.get("ports"), port, protocol)
        for p in selecting for rule in p["spec"].get(direction.lower(), []))


def allowed_flows(policies: list[dict], peers: list[Peer]) -> set[tuple[str, str, int, str]]:
    """(source, destination, port, protocol) for every connection the policies let through, between peers
    of which at least one is in a namespace with policies."""
    policed = {p["metadata"]["namespace"] for p in policies}
    flows = set()
    for src in peers:
        for dst in peers:
            if src is dst or not {src.namespace, dst.namespace} & policed:
                continue
            for port, protocol in dst.ports:
                if _allows(policies, "Egress", src, dst, port, protocol) and \
                        _allows(policies, "Ingress", dst, src, port, protocol):
                    flows.add((src.name, dst.name, port, protocol))
    return flows


# The Redis stores' pod labels (two Redis: sessions and features, each on 6379).
REDIS_POD_NAMES = tuple(name for _, name, _ in REDIS_STORES.values())
MANAGED_REDIS_IP = "10.20.30.40"  # inside overlays/prod-managed-redis's example range


def network_peers(objects: tuple[dict, ...], namespace: str) -> list[Peer]:
    peers = []
    for service, (name, _) in SERVICES.items():
        container = main_container(objects, service)
        peers.append(Peer(service, namespace, (("app.kubernetes.io/name", name),),
                          ports=tuple((p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"])))
    peers += [Peer(store, namespace, (("app.kubernetes.io/name", store),), ports=((6379, "TCP"),))
              for store in REDIS_POD_NAMES]
    peers += [
        Peer("models-fill", namespace, (("app.kubernetes.io/name", "internvl-models-fill"),)),
        Peer("other-pod-here", namespace, (("app", "something-else"),), ports=((8080, "TCP"),)),
        Peer("client", None, ip="203.0.113.7"),
        Peer("ingress-controller", "ingress-nginx", (("app.kubernetes.io/name", "ingress-nginx"),)),
        Peer("other-app", "default", (("app", "other"),), ports=((8080, "TCP"),)),
        Peer("prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),), ports=((9090, "TCP"),)),
        Peer("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), ports=((53, "UDP"), (53, "TCP"))),
        Peer("internet", None, ip="93.184.216.34", ports=((443, "TCP"), (80, "TCP"))),
        Peer("managed-redis", None, ip=MANAGED_REDIS_IP, ports=((6379, "TCP"), (6380, "TCP"))),
    ]
    return peers


def expected_flows(peers: list[Peer], namespace: str, overlay: str) -> set[tuple[str, str, int, str]]:
    """The flows docs/deploy.md lists, and nothing else."""
    flows = set()
    public = (SERVICES["gateway"][1], GATEWAY_HTTP_PORT)
    for peer in peers:
        if peer.namespace != namespace:  # clients, from anywhere outside: the public API only
            flows |= {(peer.name, "gateway", port, "TCP") for port in public}
        else:  # every pod here resolves names
            flows |= {(peer.name, "kube-dns", 53, protocol) for protocol in ("UDP", "TCP")}
    flows |= {("prometheus", service, metrics_port, "TCP") for service, metrics_port in METRICS_PORTS.items()}
    flows |= {("gateway", service, SERVICES[service][1], "TCP") for service in ("encoder", "decoder")}
    flows |= {("gateway", store, 6379, "TCP") for store in REDIS_POD_NAMES}
    if overlay == "prod-managed-redis":
        flows |= {("gateway", "managed-redis", 6379, "TCP"), ("gateway", "managed-redis", 6380, "TCP")}
    if overlay.startswith("prod"):  # the fill Job of deploy/k8s/models downloads over HTTPS
        flows.add(("models-fill", "internet", 443, "TCP"))
    return flows


GATEWAY_HTTP_PORT = 8000
METRICS_PORTS = {"gateway": 9101, "encoder": 9102, "decoder": 9103}


def namespace_policies(overlay: str) -> tuple[str, list[dict]]:
    objects = render(overlay)
    namespace = one(objects, "Deployment", SERVICES["gateway"][0])["metadata"]["namespace"]
    policies = find(objects, "NetworkPolicy")
    if overlay.startswith("prod"):  # deploy/k8s/models goes into the same namespace
        policies += find(render("models"), "NetworkPolicy")
    assert all(p["metadata"]["namespace"] == namespace for p in policies), "policies outside the namespace"
    return namespace, policies


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_listed_flows(overlay: str):
    namespace, policies = namespace_policies(overlay)
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {}
                    and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
                    and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert default_deny, f"{overlay}: no default-deny NetworkPolicy"
    objects = render(overlay)
    peers = network_peers(objects, namespace)
    gateway_ports = {port for port, _ in next(p for p in peers if p.name == "gateway").ports}
    assert {SERVICES["gateway"][1], GATEWAY_HTTP_PORT, METRICS_PORTS["gateway"]} <= gateway_ports
    allowed, expected = allowed_flows(policies, peers), expected_flows(peers, namespace, overlay)
    assert allowed == expected, (f"{overlay}: allowed but not listed: {sorted(allowed - expected)}; "
                                 f"listed but denied: {sorted(expected - allowed)}")


def test_network_evaluator_sees_open_doors():
    """Without the policies, anything reaches the encoder: the evaluator is not vacuous."""
    namespace, policies = namespace_policies("dev")
    peers = network_peers(render("dev"), namespace)
    assert ("other-app", "encoder", 50052, "TCP") not in allowed_flows(policies, peers)
    assert ("other-app", "encoder", 50052, "TCP") in allowed_flows(
        [p for p in policies if p["metadata"]["name"] not in ("internvl-default-deny", "internvl-encoder")], peers)


# Monitoring as docs/deploy.md ships it.


def test_podmonitor_scrapes_every_service():
    (monitor,) = [d for d in yaml.safe_load_all((K8S / "monitoring" / "podmonitor.yaml").read_text()) if d]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    objects = render("prod")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for service, (name, _) in SERVICES.items():
        template = one(objects, "Deployment", name)["spec"]["template"]
        assert _selects(monitor["spec"]["selector"], template["metadata"]["labels"]), f"{name} not selected"
        ports = {p["name"]: p["containerPort"] for p in main_container(objects, service)["ports"]}
        assert ports.get(endpoint["port"]) == METRICS_PORTS[service], f"{name}: no {endpoint['port']!r} port"
        assert template["metadata"]["annotations"]["prometheus.io/path"] == endpoint["path"]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORTS[service])


def test_paths_named_in_deploy_files_exist():
    """Comments and docs name files that exist (deploy/k8s/prometheus-adapter-rules.yaml never did)."""
    sources = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", ".txt", "")]
    sources += [REPO / "docs" / "deploy.md", DEPLOY / "docker" / "Dockerfile"]
    missing = []
    for source in sources:
        # Files of this repository (not `kubectl ... deploy/NAME`, nor the git-ignored key files).
        text = source.read_text(errors="replace")
        for match in re.finditer(r"(?<![\w/.-])deploy/(?:k8s|docker|compose)[A-Za-z0-9_./-]*[A-Za-z0-9_]", text):
            path = match.group(0)
            if not (REPO / path).exists():
                missing.append(f"{source.relative_to(REPO)}: {path}")
    assert not missing, "named but missing:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _default(str(v)) for k, v in env.items()}


def _default(value: str) -> str:
    """`${VAR:-default}` -> default, as compose reads it with VAR unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_pins_gpus(compose: dict):
    services = compose["services"]
    for name, device in (("encoder", "0"), ("decoder", "1")):
        devices = gpu_devices(services[name])
        assert len(devices) == 1, f"{name}: one GPU reservation"
        assert devices[0].get("driver") == "nvidia" and "gpu" in devices[0].get("capabilities", [])
        assert [str(d) for d in devices[0].get("device_ids", [])] == [device], f"{name} pinned to GPU {device}"
        assert "count" not in devices[0], "count and device_ids exclude each other"
    for name in ("gateway", "redis-sessions", "redis-features"):
        assert not gpu_devices(services[name])


def test_compose_two_redis_stores(compose: dict):
    """Sessions: the deployments' sessions.conf (noeviction, AOF) on a named volume; features: LRU."""
    services = compose["services"]
    assert "redis" not in services, "one Redis for both stores shares one eviction policy"
    env = compose_env(services["gateway"])
    for store, service_name in (("sessions", "redis-sessions"), ("features", "redis-features")):
        service = services[service_name]
        command = [_default(str(a)) for a in service["command"]]
        assert command[0] == "redis-server" and redis_bytes(command[command.index("--maxmemory") + 1]) > 0
        conf = DEPLOY / mounts_of(service)[command[1]]
        assert conf == K8S / "redis" / f"{store}.conf", f"{service_name}: the shared config file"
        settings = redis_directives(conf.read_text())
        for directive, value in REDIS_STORES[store][2].items():
            assert settings.get(directive) == value, f"{service_name}: {directive}"
        assert env[REDIS_URL_ENV[store]] == f"redis://{service_name}:6379/0"
    assert mounts_of(services["redis-sessions"]).get("/data") in compose["volumes"], "sessions on a named volume"
    assert "IVL_REDIS_URL" not in env


def mounts_of(service: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_api_key_from_secret_file(compose: dict):
    gateway = compose["services"]["gateway"]
    secrets = [s if isinstance(s, str) else s["source"] for s in gateway.get("secrets", [])]
    assert "api_keys" in secrets
    assert "file" in compose["secrets"]["api_keys"]
    env = compose_env(gateway)
    assert env["IVL_GATEWAY_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert "IVL_GATEWAY_API_KEYS" not in env and "--insecure-open" not in str(gateway)
    secrets_dir = DEPLOY / Path(_default(compose["secrets"]["api_keys"]["file"])).parent
    example = secrets_dir / "api_keys.example"
    from services.common.security import load_api_keys

    assert load_api_keys(str(example)), "the example key file holds a key in the gateway's format"
    ignore = (secrets_dir / ".gitignore").read_text().split()
    assert "*" in ignore, "real key files in deploy/secrets/ must be git-ignored"


def test_compose_health_and_start_order(compose: dict):
    services = compose["services"]
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
    for name in ("encoder", "decoder", "gateway"):
        port = HEALTH_PORTS[name]
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "grpc_health_probe.py" in test and f"--port {port}" in test, f"{name}: {test}"
        assert services[name]["build"]["target"] == name
    depends = services["gateway"]["depends_on"]
    assert {k: v["condition"] for k, v in depends.items()} == dict.fromkeys(
        ("redis-sessions", "redis-features", "encoder", "decoder"), "service_healthy")


def test_compose_settings(compose: dict):
    services = compose["services"]
    gateway_env = compose_env(services["gateway"])
    for name, target_env in (("encoder", "IVL_ENCODER_TARGET"), ("decoder", "IVL_DECODER_TARGET")):
        assert gateway_env[target_env] == f"dns:///{name}:{SERVICES[name][1]}"
    for name in ("encoder", "decoder", "gateway"):
        env = compose_env(services[name])
        unknown = {k for k in env if k.startswith("IVL_")} - known_env_names(name) - {"IVL_MODEL"}
        assert not unknown, f"{name}: env vars the {name} does not read: {sorted(unknown)}"
        config = parse_config(name, env)
        if name != "gateway":
            assert config.device == "cuda" and config.port == SERVICES[name][1]
        stop = re.fullmatch(r"(\d+)s", services[name]["stop_grace_period"])
        assert stop and int(stop.group(1)) > grace_seconds(name, config), f"{name}: stop_grace_period"


def test_compose_drain_covers_longest_generation(compose: dict):
    """As in Kubernetes: `docker compose down` lets the longest generation the gateway accepts finish."""
    configs = {name: parse_config(name, compose_env(compose["services"][name])) for name in ("decoder", "gateway")}
    longest_s = configs["gateway"].max_new_tokens / MIN_DECODE_TOKENS_PER_S
    assert configs["decoder"].default_max_new_tokens <= configs["gateway"].max_new_tokens
    for name, config in configs.items():
        assert grace_seconds(name, config) >= longest_s, f"{name}: drain shorter than {longest_s:.0f}s"
    # A model service whose engine does not recover exits non-zero: compose must restart it.
    for name in ("encoder", "decoder"):
        assert compose["services"][name].get("restart") in ("always", "unless-stopped", "on-failure"), name


# ------------------------------------------------------------------------------------------ images


DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def dockerfile_stages() -> dict[str, str]:
    stages: dict[str, str] = {}
    name = ""
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            name = match.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        elif name:
            stages[name] += line + "\n"
    return stages


def test_dockerfile_targets():
    stages = dockerfile_stages()
    text = DOCKERFILE.read_text()
    for target in ("encoder", "decoder", "gateway"):
        assert target in stages, f"no `FROM ... AS {target}` stage"
        assert "HEALTHCHECK" in stages[target] and "grpc_health_probe.py" in stages[target]
        assert "ENTRYPOINT" in stages[target]
    assert re.search(r"^USER 10001", stages["model-runtime"], re.M) and re.search(r"^USER 10001", stages["gateway"],
                                                                                   re.M)
    assert "FROM model-runtime AS encoder" in text and "FROM model-runtime AS decoder" in text
    gateway_build = stages["gateway-build"]
    assert "--no-deps" in gateway_build and "requirements-gateway.txt" in gateway_build
    assert "torch" not in stages["gateway"] and "pip install torch" not in gateway_build
    assert "cuda" in text.split("AS model-build")[0].lower()


def test_gateway_requirements_match_pyproject():
    import tomllib  # Python >= 3.11, like the project's virtualenv

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-"): str(Requirement(r).specifier)
                for r in project["dependencies"]}
    for req in gateway_requirements():
        name = req.name.lower().replace("_", "-")
        assert name in declared, f"{req.name} is not a dependency of the package"
        assert str(req.specifier) == declared[name], f"{req.name}: {req.specifier} != pyproject's {declared[name]}"
    assert "torch" not in {r.name for r in gateway_requirements()}


def gateway_requirements() -> list[Requirement]:
    lines = (DEPLOY / "docker" / "requirements-gateway.txt").read_text().splitlines()
    return [Requirement(line) for line in (ln.split("#")[0].strip() for ln in lines) if line]


def requirement_closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


_IMPORT_GUARD = """
import importlib.abc, runpy, sys
allowed = set(sys.argv[1].split(","))
dists = __import__("importlib.metadata").metadata.packages_distributions()
class OnlyGatewayRequirements(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        owners = {d.lower().replace("_", "-") for d in dists.get(top, [])}
        if owners and not owners & allowed:
            raise ModuleNotFoundError(f"{top} is not in the gateway image", name=name)
sys.meta_path.insert(0, OnlyGatewayRequirements())
import gateway.__main__, gateway.cli, gateway.config
sys.argv = ["gateway", "--help"]
try:
    runpy.run_module("gateway", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert "torch" not in sys.modules and "numpy" not in sys.modules
"""


def test_gateway_runs_on_its_image_requirements():
    """`python -m gateway` imports nothing outside requirements-gateway.txt (no torch, numpy, PIL)."""
    allowed = requirement_closure([r.name for r in gateway_requirements()]) | {"internvl-serving"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_GUARD, ",".join(sorted(allowed))], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the gateway needs more than its image has:\n{proc.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------ health probe


PROBE = DEPLOY / "docker" / "grpc_health_probe.py"


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(None)


def probe(*args: str) -> int:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, timeout=60).returncode


def test_health_probe_exit_codes(health_server):
    port, servicer = health_server
    states = health_pb2.HealthCheckResponse
    servicer.set("", states.NOT_SERVING)
    assert probe("--port", str(port)) == 1
    servicer.set("", states.SERVING)
    assert probe("--port", str(port)) == 0
    assert probe("--addr", f"127.0.0.1:{port}", "--service", "internvl.v1.Nope") == 2  # NOT_FOUND
    servicer.set("internvl.v1.VisionEncoder", states.SERVING)
    assert probe("--port", str(port), "--service", "internvl.v1.VisionEncoder") == 0
    with socket_closed_port() as closed:
        assert probe("--port", str(closed), "--timeout", "1") == 2
    assert probe() == 3


@contextlib.contextmanager
def socket_closed_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound, not listening: connections are refused
