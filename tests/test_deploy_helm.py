"""The Helm chart: values against values.schema.json, every `.Values` path a template uses, the chart
README's values table; `helm lint --strict`, and `helm template` with the defaults and each ci/*-values.yaml
through `kubernetes-validate --strict` for Kubernetes 1.30. helm comes from scripts/install-helm.sh (into the
virtual environment), kubernetes-validate from the test extra; without them these tests skip, except in CI."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

from cli.main import build_parser
from harness.procs import REPO
from model_server.specs import ModelSpec
from tests.ci import tool_missing
from tests.deploy_env import SETTINGS, settings_field

CHART = REPO / "helm" / "genembed"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TEMPLATES = sorted((CHART / "templates").rglob("*.yaml")) + sorted((CHART / "templates").glob("*.t*"))
VALUES_REF = re.compile(r"\$?\.Values((?:\.\w+)+)")
# `$name := .Values.a.b` (also through deepCopy) in a template: `$name.c` then means .Values.a.b.c.
ALIAS = re.compile(r"\$(\w+)\s*:=\s*(?:deepCopy\s+)?\$?\.Values((?:\.\w+)+)\s*\}\}")
ALIAS_REF = re.compile(r"\$(\w+)((?:\.\w+)+)")
# Template variables that hold one (merged) entry of workers.models.
MODEL_ENTRY = {"m", "w"}
KUBERNETES = "1.30.0"  # the oldest release the chart is checked against
# Custom resources no Kubernetes schema covers (kubernetes-validate warns and accepts them).
CUSTOM_KINDS = {"ServiceMonitor"}


def merged(*files: Path) -> dict:
    """values.yaml with files layered on top the way helm does (maps merge, everything else replaces)."""

    def layer(base: dict, top: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in top.items():
            out[key] = layer(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    values = VALUES
    for path in files:
        values = layer(values, yaml.safe_load(path.read_text()))
    return values


def validator() -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    return jsonschema.Draft7Validator(SCHEMA)


def schema_at(path: list[str]) -> dict | None:
    """The schema node of a values path (`[]`: a list's items), or None when the schema has no such key."""
    node = deref(SCHEMA)
    for key in path:
        if key == "[]":
            child = node.get("items")
        elif key in node.get("properties", {}):
            child = node["properties"][key]
        elif node.get("type") == "object" and "properties" not in node:
            return {}  # a free-form map (resources, nodeSelector, env): any key
        else:
            return None
        if child is None:
            return None
        node = deref(child)
    return node


def deref(node: dict) -> dict:
    """Follows `$ref` and merges `allOf` parts into one node."""
    if "$ref" in node:
        target = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return deref(target)
    if "allOf" in node:
        out = {key: value for key, value in node.items() if key != "allOf"}
        for part in map(deref, node["allOf"]):
            out.setdefault("properties", {}).update(part.get("properties", {}))
            out.setdefault("type", part.get("type"))
        return out
    return node


def values_has(path: list[str]) -> bool:
    node: object = VALUES
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [None, *CI_VALUES], ids=["values.yaml", *(p.name for p in CI_VALUES)])
def test_values_match_the_schema(extra: Path | None) -> None:
    values = merged(*([extra] if extra else []))
    validator().validate(values)
    for model in values["workers"]["models"]:
        if "spec" in model:
            ModelSpec.model_validate(model["spec"])  # an inline spec is what the worker will load
    for key in values["gateway"]["env"]:
        settings_field("gateway", key)
    for entry in [values["workers"]["defaults"], *values["workers"]["models"]]:
        for key in entry.get("env", {}):
            settings_field("worker", key)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda v: v["gateway"].update(replicas=3), "Additional properties"),
        (lambda v: v["workers"]["models"].append({"name": "no-model"}), "is not valid under any"),
        (lambda v: v["workers"]["models"].append({"name": "Bad_Name", "model": "minilm-l6"}), "does not match"),
        (lambda v: v["redis"].update(maxmemoryPolicy="lru"), "is not one of"),
        (lambda v: v["workers"]["defaults"].update(gpu=1), "Additional properties"),
    ],
)
def test_schema_rejects_mistakes(change, complaint: str) -> None:
    values = copy.deepcopy(VALUES)
    change(values)
    errors = [e.message for e in validator().iter_errors(values)]
    assert any(complaint in message for message in errors), errors


def test_every_values_path_in_templates_exists() -> None:
    missing = []
    for template in TEMPLATES:
        text = template.read_text()
        aliases = {name: path.strip(".").split(".") for name, path in ALIAS.findall(text)}
        refs = [path.strip(".").split(".") for path in VALUES_REF.findall(text)]
        for name, path in ALIAS_REF.findall(text):
            keys = path.strip(".").split(".")
            if name in MODEL_ENTRY:
                refs.append(["workers", "models", "[]", *keys])
            elif name in aliases:
                refs.append([*aliases[name], *keys])
        for ref in refs:
            in_values = "[]" in ref or values_has(ref)
            if not in_values or schema_at(ref) is None:
                missing.append(f"{template.name}: .Values.{'.'.join(ref)}")
    assert not missing, "\n".join(missing)


def test_model_entries_accept_every_worker_default() -> None:
    """A model entry may override any key of workers.defaults, and the schema says so for both."""
    defaults = set(VALUES["workers"]["defaults"])
    item = schema_at(["workers", "models", "[]"])
    assert defaults <= set(item["properties"])
    assert defaults == set(schema_at(["workers", "defaults"])["properties"])


def test_readme_values_table_covers_values_yaml() -> None:
    documented = set(re.findall(r"^\| `([\w.\[\]]+)` \|", (CHART / "README.md").read_text(), flags=re.M))

    def leaves(node: object, prefix: str) -> list[str]:
        if isinstance(node, dict) and node and prefix not in documented:
            return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}".lstrip("."))]
        return [prefix]

    assert not [leaf for leaf in leaves(VALUES, "") if leaf not in documented], "values missing from README.md"
    assert not [path for path in documented if not values_has(path.split("."))], "README.md documents no value"


def test_dashboard_is_valid_json_on_a_datasource_variable() -> None:
    dashboard = json.loads((CHART / "dashboards" / "genembed.json").read_text())
    assert dashboard["uid"] == "genembed"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"]


# ---------------------------------------------------------------------------------------------
# With helm and kubernetes-validate


def tool(name: str) -> str:
    """A command from PATH or from this interpreter's bin/ (the virtual environment's, activated or not)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        tool_missing(f"{name} is not installed: bash scripts/setup-tests.sh")
    return found


def helm(*args: str) -> str:
    done = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def kubernetes_validate(manifests: Path) -> subprocess.CompletedProcess:
    command = [tool("kubernetes-validate"), "--strict", "--quiet", "--kubernetes-version", KUBERNETES, str(manifests)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra", [None, *CI_VALUES], ids=["values.yaml", *(p.name for p in CI_VALUES)])
def test_helm_lint_and_template(extra: Path | None, tmp_path: Path) -> None:
    flags = ["--kube-version", KUBERNETES, *(["-f", str(extra)] if extra else [])]
    helm("lint", "--strict", str(CHART), *flags)
    rendered = helm("template", "genembed", str(CHART), *flags)
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc]

    # The genembed commands the pods run parse; the gateway gets one --worker per model.
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    for deployment in deployments.values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container.get("args", [""])[0] == "genembed":
                build_parser().parse_args(container["args"][1:])
    gateway = deployments["genembed-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"].count("--worker") == len(merged(*([extra] if extra else []))["workers"]["models"])
    for name, deployment in deployments.items():
        process = name.removeprefix("genembed-").split("-")[0]
        if process in SETTINGS:
            for variable in deployment["spec"]["template"]["spec"]["containers"][0].get("env", []):
                settings_field(process, variable["name"])

    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(rendered)
    done = kubernetes_validate(manifests)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in filter(str.strip, done.stdout.splitlines()):  # --quiet: warnings only
        assert any(f"kind {kind} " in line for kind in CUSTOM_KINDS), done.stdout


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The strict check above can fail: a misspelt field in a pod spec is an error, not ignored."""
    manifest = tmp_path / "pod.yaml"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}
    manifest.write_text(
        yaml.safe_dump({**pod, "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolice": "x"}]}})
    )
    done = kubernetes_validate(manifest)
    assert done.returncode != 0 and "imagePullPolice" in done.stdout + done.stderr, done.stdout + done.stderr


def test_workers_scale_on_their_expected_drain_time_when_asked() -> None:
    """Off by default; on for a model entry, an autoscaling/v2 HPA on the workers' drain-time Pods metric owns that
    model's replica count (its Deployment sets none) while the other models keep theirs; the gateway's stays on CPU."""

    def render(*flags: str) -> list[dict]:
        rendered = helm("template", "genembed", str(CHART), "--kube-version", KUBERNETES, *flags)
        return [doc for doc in yaml.safe_load_all(rendered) if doc]

    def scalers(documents: list[dict]) -> dict[str, dict]:
        return {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "HorizontalPodAutoscaler"}

    def deployments(documents: list[dict]) -> dict[str, dict]:
        return {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "Deployment"}

    defaults = render()
    assert set(scalers(defaults)) == {"genembed-gateway"}
    assert deployments(defaults)["genembed-worker-gircse"]["replicas"] == 1

    documents = render("-f", str(CHART / "ci" / "full-values.yaml"))
    hpas = scalers(documents)
    assert set(hpas) == {"genembed-gateway", "genembed-worker-gircse"}
    assert [m["resource"]["name"] for m in hpas["genembed-gateway"]["metrics"]] == ["cpu"]
    worker = hpas["genembed-worker-gircse"]
    assert worker["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "genembed-worker-gircse"}
    assert (worker["minReplicas"], worker["maxReplicas"]) == (2, 6)
    assert worker["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "genembed_worker_expected_drain_seconds"},
                "target": {"type": "AverageValue", "averageValue": "4"},
            },
        }
    ]
    assert worker["behavior"]["scaleDown"] == {"stabilizationWindowSeconds": 900}
    assert "replicas" not in deployments(documents)["genembed-worker-gircse"]
    assert deployments(documents)["genembed-worker-minilm"]["replicas"] == 1

    values = copy.deepcopy(VALUES)
    values["workers"]["defaults"]["autoscaling"]["targetDrainSeconds"] = 0
    assert any("targetDrainSeconds" in str(e.path) for e in validator().iter_errors(values))


# ---------------------------------------------------------------------------------------------
# NetworkPolicies: who reaches whom, evaluated on the rendered objects with Kubernetes' semantics

NAMESPACE = "default"  # helm template's release namespace


def rendered(*flags: str) -> list[dict]:
    text = helm("template", "genembed", str(CHART), "--kube-version", KUBERNETES, *flags)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (`{}` selects everything)."""
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        held = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values}
        held |= {"Exists": key in labels, "DoesNotExist": key not in labels}
        if not held[operator]:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    labels: dict[str, str]
    namespace: str = NAMESPACE
    ports: tuple[tuple[str, int], ...] = ()  # (name, number) of its containers' ports


def pods(documents: list[dict]) -> dict[str, Pod]:
    """Each workload's pods (Deployments, StatefulSets, the helm test Pod) by the workload's name."""
    found = {}
    for doc in documents:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            meta, spec = doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            meta, spec = doc["metadata"], doc["spec"]
        else:
            continue
        ports = tuple((p.get("name", ""), p["containerPort"]) for c in spec["containers"] for p in c.get("ports", []))
        found[doc["metadata"]["name"]] = Pod(meta["labels"], ports=ports)
    return found


def admits(documents: list[dict], source: Pod, target: Pod, port: str) -> bool:
    """Whether `source` may open a connection to `target`'s container port named `port`: a pod no policy selects
    accepts anything; otherwise one ingress rule of a policy that selects it must match the source and the port."""
    number = dict(target.ports)[port]
    policies = [
        doc["spec"]
        for doc in documents
        if doc["kind"] == "NetworkPolicy" and selects(doc["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True

    def peer_matches(peer: dict) -> bool:
        namespace_labels = {"kubernetes.io/metadata.name": source.namespace}
        if "namespaceSelector" in peer and not selects(peer["namespaceSelector"], namespace_labels):
            return False
        if "namespaceSelector" not in peer and source.namespace != NAMESPACE:
            return False  # a podSelector alone means the policy's own namespace
        return selects(peer.get("podSelector") or {}, source.labels)

    return any(
        ("from" not in rule or any(peer_matches(peer) for peer in rule["from"]))
        and ("ports" not in rule or any(entry["port"] in (port, number) for entry in rule["ports"]))
        for policy in policies
        if "Ingress" in policy.get("policyTypes", ["Ingress"])
        for rule in policy.get("ingress") or []
    )


STRANGER = Pod({"app": "something-else"})
PROMETHEUS = Pod({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")


def test_network_policies_admit_only_the_gateway_behind_it() -> None:
    documents = rendered()
    pod = pods(documents)
    gateway, worker, redis = pod["genembed-gateway"], pod["genembed-worker-gircse"], pod["genembed-redis"]
    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    for name, target in pod.items():  # every workload is covered: a new one without a policy fails here
        if name != "genembed-test":  # `helm test`'s pod accepts nothing
            assert any(selects(p["spec"]["podSelector"], target.labels) for p in policies), name

    # The gateway: anyone, on its API port.
    for source in (STRANGER, PROMETHEUS, Pod({}, namespace="elsewhere")):
        assert admits(documents, source, gateway, "http")
    # Workers: the gateway and the metrics scraper (labels and namespace both), nobody else.
    assert admits(documents, gateway, worker, "http")
    assert admits(documents, PROMETHEUS, worker, "http")
    for source in (STRANGER, redis, worker, Pod(PROMETHEUS.labels), Pod({}, namespace="monitoring")):
        assert not admits(documents, source, worker, "http"), source
    # Redis: the gateway only; the scraper has nothing to scrape there.
    assert admits(documents, gateway, redis, "redis")
    for source in (STRANGER, worker, PROMETHEUS, pod["genembed-test"]):
        assert not admits(documents, source, redis, "redis"), source


def test_network_policies_with_every_option() -> None:
    """The judge behind the gateway; the gateway limited to gateway.from (plus this release's `helm test` pod and
    the scraper); a scraper selected in every namespace."""
    documents = rendered("-f", str(CHART / "ci" / "full-values.yaml"))
    pod = pods(documents)
    gateway, judge, worker = pod["genembed-gateway"], pod["genembed-judge"], pod["genembed-worker-minilm"]
    ingress = Pod({"app": "controller"}, namespace="ingress-nginx")
    scraper = Pod(PROMETHEUS.labels, namespace="observability")

    assert admits(documents, gateway, judge, "http") and admits(documents, scraper, judge, "http")
    assert not admits(documents, worker, judge, "http") and not admits(documents, STRANGER, judge, "http")
    for source in (ingress, pod["genembed-test"], scraper):
        assert admits(documents, source, gateway, "http"), source
    for source in (STRANGER, Pod({}, namespace="elsewhere")):
        assert not admits(documents, source, gateway, "http"), source
    assert admits(documents, scraper, worker, "http") and not admits(documents, ingress, worker, "http")


def test_network_policies_switch_off() -> None:
    documents = rendered("--set", "networkPolicy.enabled=false")
    assert not [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    pod = pods(documents)
    assert admits(documents, STRANGER, pod["genembed-worker-gircse"], "http")


def container(documents: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in documents if (d["kind"], d["metadata"]["name"]) == (kind, name)]
    return doc["spec"]["template"]["spec"]["containers"][0]


def secret_env(variables: list[dict]) -> dict[str, str]:
    """Each variable's Secret; fails for one given as a plain value."""
    assert all("value" not in v for v in variables if v["name"] in SECRET_VARIABLES), variables
    return {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in variables if v["name"] in SECRET_VARIABLES}


SECRET_VARIABLES = {
    "GENEMBED_WORKER_TOKEN",
    "GENEMBED_WORKER_ROTATION_TOKEN",
    "GENEMBED_REDIS_PASSWORD",
    "REDISCLI_AUTH",
}
FULL, EXTERNAL = CHART / "ci" / "full-values.yaml", CHART / "ci" / "external-values.yaml"


@pytest.mark.parametrize(
    ("values_file", "token_secret", "redis_secret", "redis_url"),
    [
        (None, "genembed-internal", "genembed-internal", "redis://genembed-redis:6379/0"),
        (
            FULL,
            "genembed-internal",
            "genembed-redis-password",
            "rediss://genembed-redis:6379/0?ssl_ca_certs=/etc/genembed/redis-tls/ca.crt",
        ),
        (EXTERNAL, "genembed-worker-token", None, None),
    ],
    ids=["values.yaml", FULL.name, EXTERNAL.name],
)
def test_the_secrets_reach_the_pods_from_secrets_only(
    values_file: Path | None, token_secret: str, redis_secret: str | None, redis_url: str | None
) -> None:
    """The worker token and the Redis password come from the generated Secret (or the operator's), never as values
    in a pod spec or ConfigMap; the gateway's Redis URL carries no password, and is rediss:// with TLS on."""
    documents = rendered(*(["-f", str(values_file)] if values_file else []))
    gateway = container(documents, "Deployment", "genembed-gateway")["env"]
    worker = container(documents, "Deployment", "genembed-worker-gircse")["env"]
    expected = {"GENEMBED_WORKER_TOKEN": token_secret}
    assert secret_env(gateway) == expected | ({"GENEMBED_REDIS_PASSWORD": redis_secret} if redis_secret else {})
    assert secret_env(worker) == expected | {"GENEMBED_WORKER_ROTATION_TOKEN": token_secret}
    secrets = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Secret"}
    if redis_secret is None:
        assert "genembed-redis" not in pods(documents)
    else:
        assert {v["name"]: v["value"] for v in gateway if "value" in v}["GENEMBED_REDIS_URL"] == redis_url
        redis = container(documents, "StatefulSet", "genembed-redis")
        assert secret_env(redis["env"]) == {"REDISCLI_AUTH": redis_secret}
        assert redis["args"][1:3] == ["--requirepass", "$(REDISCLI_AUTH)"]
    values = merged(*([values_file] if values_file else []))["workerAuth"]
    if "genembed-internal" in (token_secret, redis_secret):
        data = {key: base64.b64decode(value).decode() for key, value in secrets["genembed-internal"]["data"].items()}
        assert len(data["worker-token"]) >= 32 and data["worker-token"] == (values["token"] or data["worker-token"])
        assert data.get("worker-rotation-token", "") == values["rotationToken"]
        assert ("redis-password" in data) == (redis_secret == "genembed-internal")
    else:
        assert "genembed-internal" not in secrets
    for doc in documents:
        if doc["kind"] == "ConfigMap" and values["token"]:
            assert values["token"] not in json.dumps(doc)


# ---------------------------------------------------------------------------------------------
# The Batch API's storage (values: batches; docs/batch.md)


def batch_storage(*flags: str) -> tuple[dict[str, dict], list[dict], dict | None, list[dict]]:
    """The gateway's variables (by name), its `batches` mounts, its `batches` volume, and the rendered claims."""
    documents = rendered(*flags)
    (deployment,) = [d for d in documents if (d["kind"], d["metadata"]["name"]) == ("Deployment", "genembed-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    env = {v["name"]: v for v in pod["containers"][0]["env"]}
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "batches"]
    volume = next((v for v in pod["volumes"] if v["name"] == "batches"), None)
    return env, mounts, volume, [d for d in documents if d["kind"] == "PersistentVolumeClaim"]


def test_batches_live_in_an_empty_dir_a_claim_or_a_bucket(tmp_path: Path) -> None:
    directory = {"name": "batches", "mountPath": "/var/lib/genembed/batches"}
    env, mounts, volume, claims = batch_storage()
    assert env["GENEMBED_BATCH_DIR"]["value"] == directory["mountPath"] and mounts == [directory]
    assert volume == {"name": "batches", "emptyDir": {}} and claims == []

    flags = ["--set", "batches.persistence.enabled=true", "--set", "batches.persistence.storageClass=nfs"]
    env, mounts, volume, claims = batch_storage(*flags)
    (claim,) = claims
    assert volume == {"name": "batches", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi" and mounts == [directory]
    manifests = tmp_path / "claim.yaml"
    manifests.write_text(helm("template", "genembed", str(CHART), "--kube-version", KUBERNETES, *flags))
    done = kubernetes_validate(manifests)
    assert done.returncode == 0, done.stdout + done.stderr

    _, _, volume, claims = batch_storage(
        "--set", "batches.persistence.enabled=true", "--set", "batches.persistence.existingClaim=mine"
    )
    assert volume == {"name": "batches", "persistentVolumeClaim": {"claimName": "mine"}} and claims == []

    s3 = ["--set", "batches.s3.bucket=corpora", "--set", "batches.s3.existingSecret=s3-keys"]
    env, mounts, volume, claims = batch_storage(*s3, "--set", "batches.persistence.enabled=true")
    assert env["GENEMBED_BATCH_S3_BUCKET"]["value"] == "corpora" and "GENEMBED_BATCH_DIR" not in env
    assert env["GENEMBED_BATCH_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-keys",
        "key": "secret-access-key",
    }
    assert (mounts, volume, claims) == ([], None, [])
    for name in env:
        settings_field("gateway", name)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["batches", "maxInFlight"], 0),
        (["batches", "persistence", "accessModes"], ["ReadWriteSometimes"]),
        (["batches", "persistence", "size"], "lots"),
        (["batches", "s3", "endpointUrl"], "minio:9000"),
        (["batches", "s3", "bucketName"], "x"),
    ],
)
def test_the_schema_rejects_batch_storage_mistakes(path: list[str], value: object) -> None:
    values = copy.deepcopy(VALUES)
    node = values
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(validator().iter_errors(values)), f"{'.'.join(path)}={value!r} passed the schema"
