"""The Helm chart: values against values.schema.json, every `.Values` path a template uses, the chart
README's values table; `helm lint --strict`, and `helm template` with the defaults and each ci/*-values.yaml
through `kubernetes-validate --strict` for Kubernetes 1.30. helm comes from scripts/install-helm.sh (into the
virtual environment), kubernetes-validate from the test extra; without them these tests skip, except in CI."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from model_server.specs import ModelSpec
from service.cli import build_parser
from tests.ci import tool_missing
from tests.deploy_env import SETTINGS, settings_field
from tests.procs import REPO

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
