"""The compose stack without a Docker engine.

`docker-compose config` (Debian's 1.29) validates every combination of the base file and its overrides;
the wiring between services is checked on the merged result; `.env.example` must list every variable
the files read; and the base file's own commands and environment run as local processes (redis, a
worker, the gateway on free loopback ports) that must answer like the stack would.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml

from cli.main import build_parser
from harness.procs import REPO, free_port, genembed, running
from tests.deploy_env import SETTINGS, settings_field

COMPOSE_DIR = REPO / "docker"
BASE = "docker-compose.yml"
OVERRIDES = sorted(path.name for path in COMPOSE_DIR.glob("compose.*.yaml"))
COMBINATIONS = [(BASE,), *((BASE, name) for name in OVERRIDES), (BASE, *OVERRIDES)]
DASHBOARD = REPO / "helm" / "genembed" / "dashboards" / "genembed.json"
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(node: object, env: dict[str, str]) -> object:
    """Compose's `${VAR}` / `${VAR:-default}` substitution over a loaded file."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        return VARIABLE.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", node).replace("$$", "$")
    return node


def compose_defaults() -> dict[str, set[str]]:
    """Every variable the compose files read, with the defaults they give it."""
    found: dict[str, set[str]] = {}
    for path in COMPOSE_DIR.glob("*compose*.y*ml"):
        for name, default in VARIABLE.findall(json.dumps(yaml.safe_load(path.read_text()))):
            found.setdefault(name, set()).add(default)
    return found


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def listen_port(service: dict) -> int | None:
    command = service.get("command") or []
    if "--port" in command:
        return int(command[command.index("--port") + 1])
    return 6379 if str(service.get("image", "")).startswith("redis:") else None


def urls_in(service: dict) -> list[str]:
    values = [*(service.get("command") or []), *(service.get("environment") or {}).values()]
    return [part for value in values for part in re.findall(r"\w+://[^\s,]+", str(value))]


def mounted_files(service: dict) -> list[tuple[Path, str]]:
    """Bind mounts of `docker-compose config` output as (host path, container path)."""
    mounts = []
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith("/"):
            mounts.append((Path(source), rest.split(":")[0]))
    return mounts


# ---------------------------------------------------------------------------------------------
# docker-compose config, per combination


def docker_compose_config(files: tuple[str, ...]) -> dict:
    if shutil.which("docker-compose") is None:
        notice = "docker-compose not on PATH: compose files not validated (apt-get install docker-compose)"
        warnings.warn(notice, stacklevel=2)
        pytest.skip("docker-compose not on PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    args = [arg for name in files for arg in ("-f", name)]
    done = subprocess.run(
        ["docker-compose", *args, "config"], cwd=COMPOSE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("files", COMBINATIONS, ids=["+".join(f) for f in COMBINATIONS])
def test_compose_config_and_wiring(files: tuple[str, ...]) -> None:
    services = docker_compose_config(files)["services"]
    ports = {name: listen_port(service) for name, service in services.items()}

    # Every URL a service is given names a service of this combination, on the port it listens on.
    for name, service in services.items():
        for url in urls_in(service):
            parts = urlsplit(url)
            if parts.hostname in services:
                assert parts.port == ports[parts.hostname], f"{name}: {url} misses {parts.hostname}'s port"
    gateway = services["gateway"]
    argv = gateway["command"]
    worker_urls = [argv[i + 1].split("=", 1)[1] for i, arg in enumerate(argv) if arg == "--worker"]
    assert worker_urls, "the gateway is given no worker"
    for url in worker_urls:
        assert urlsplit(url).hostname in services, f"the gateway's worker {url} is not started"

    # The gateway starts after its dependencies are healthy; each of them has a health check.
    for dependency, condition in gateway["depends_on"].items():
        if condition["condition"] == "service_healthy":
            assert services[dependency].get("healthcheck"), f"{dependency} has no healthcheck"
    assert {"worker", "redis"} <= {d for d, c in gateway["depends_on"].items() if c["condition"] == "service_healthy"}

    # genembed commands parse, bind-mounted files exist, Prometheus scrapes only services that run.
    for name in ("worker", "gateway"):
        assert services[name]["command"][0] == "genembed"
        build_parser().parse_args(services[name]["command"][1:])
    for service in services.values():
        for source, _ in mounted_files(service):
            assert source.exists(), f"bind mount source {source} does not exist"
    for source, target in mounted_files(services["prometheus"]):
        if "/scrape.d/" in target:
            for job in yaml.safe_load(source.read_text())["scrape_configs"]:
                for target_group in job["static_configs"]:
                    for address in target_group["targets"]:
                        host, _, port = address.partition(":")
                        assert host in services and ports[host] == int(port), f"Prometheus scrapes {address}"


# ---------------------------------------------------------------------------------------------
# Variables and settings


def test_env_example_lists_every_variable_with_the_compose_default() -> None:
    defaults = compose_defaults()
    example = env_example()
    assert set(example) == set(defaults), "docker/.env.example and the compose files name different variables"
    for name, values in defaults.items():
        assert values == {example[name]}, f"{name}: compose defaults {values} vs .env.example {example[name]!r}"


def test_container_environment_names_real_settings() -> None:
    """Every GENEMBED_* name is a setting, the service's environment parses as a whole (settings that go together,
    such as the Redis URL and password), and a value the user can change through .env defaults to the setting's
    own default (where the setting has one)."""
    for path in COMPOSE_DIR.glob("*compose*.y*ml"):
        services = yaml.safe_load(path.read_text())["services"]
        for process in SETTINGS:
            environment = (services.get(process) or {}).get("environment") or {}
            fields = {key: settings_field(process, key) for key in environment}
            settings_class = SETTINGS[process][0]
            settings = settings_class(**{f: interpolate(str(environment[k]), {}) for k, f in fields.items() if f})
            for key, raw in environment.items():
                field = fields[key]
                if field is None:
                    continue
                parsed = getattr(settings, field)
                default = settings_class.model_fields[field].get_default(call_default_factory=True)
                # A setting with no default (unset = not configured, e.g. the judge) is wiring, not a default.
                if "${" in str(raw) and default is not None:
                    assert parsed == default, f"{path.name}: {key} defaults to {raw!r}, the setting to {default!r}"


# ---------------------------------------------------------------------------------------------
# The base stack as local processes


@contextlib.contextmanager
def redis_server(command: list[str], port: int, log_path: Path, password: str | None) -> Iterator[None]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client = redis.Redis(port=port, password=password, socket_timeout=1)
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        break
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def gateway_only_shim(directory: Path) -> Path:
    """A sitecustomize that makes the worker-only dependencies unimportable, as in the gateway image."""

    def names(requirements: list[str]) -> set[str]:
        bare = (re.split(r"[<>=!~\[ ;]", line.strip())[0] for line in requirements if not line.startswith("#"))
        return {re.sub(r"[-_.]+", "-", name).lower() for name in bare if name}

    core = names(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    gateway = names((COMPOSE_DIR / "requirements-gateway.txt").read_text().splitlines())
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if names(dists) & (core - gateway)
    )
    assert "torch" in blocked
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is not in the gateway image')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return directory


def metric_families(text: str) -> set[str]:
    """Family names of a text exposition (a counter's TYPE line names it with _total)."""
    return {line.split()[2].removesuffix("_total") for line in text.splitlines() if line.startswith("# TYPE ")}


def dashboard_metrics() -> set[str]:
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])]
    names = {name for expr in exprs for name in re.findall(r"\bgenembed_\w+", expr)}
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}


def test_compose_stack_serves_embeddings(tmp_path: Path) -> None:
    """redis, worker and gateway as the base compose file starts them (minilm-l6 for speed, an API key set)."""
    key = "compose-test-key"
    env = {"GENEMBED_MODEL": "minilm-l6", "GENEMBED_API_KEYS": key}
    services = interpolate(yaml.safe_load((COMPOSE_DIR / BASE).read_text()), env)["services"]
    ports = {name: (listen_port(services[name]), free_port()) for name in ("redis", "worker", "gateway")}
    volumes = {
        target: tmp_path / source
        for service in services.values()
        for source, _, target in (str(v).partition(":") for v in service.get("volumes") or [])
        if not source.startswith(".")
    }

    def local(value: str) -> str:
        for name, (container_port, host_port) in ports.items():
            value = value.replace(f"{name}:{container_port}", f"127.0.0.1:{host_port}")
        for target, path in volumes.items():
            if value == target or value.startswith(target + "/"):
                value = str(path) + value[len(target) :]
        return value

    def command(name: str) -> list[str]:
        argv = [local(str(arg)).replace("0.0.0.0", "127.0.0.1") for arg in services[name]["command"]]
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(ports[name][1])
        return genembed(*argv[1:]) if argv[0] == "genembed" else argv

    def environment(name: str) -> dict[str, str]:
        return {key: local(str(value)) for key, value in (services[name].get("environment") or {}).items()}

    def healthcheck(name: str) -> list[str]:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: healthcheck must use the exec form"
        container_port, host_port = ports[name]
        argv = [arg.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{host_port}") for arg in test[1:]]
        if argv[0] == "python":
            argv[0] = sys.executable
        if argv[0] == "redis-cli":
            argv[1:1] = ["-p", str(host_port)]
        return argv

    gateway_env = environment("gateway")
    shim = gateway_only_shim(tmp_path / "gateway-image")
    gateway_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    redis_port = ports["redis"][1]
    redis_cmd = [*command("redis"), "--port", str(redis_port), "--bind", "127.0.0.1"]
    redis_password = environment("gateway")["GENEMBED_REDIS_PASSWORD"]
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] == redis_password
    worker_url = f"http://127.0.0.1:{ports['worker'][1]}"
    gateway_url = f"http://127.0.0.1:{ports['gateway'][1]}"

    with (
        redis_server(redis_cmd, redis_port, tmp_path / "redis.log", redis_password),
        running(command("worker"), f"{worker_url}/ready", env=environment("worker"), log_path=tmp_path / "worker.log"),
        running(command("gateway"), f"{gateway_url}/ready", env=gateway_env, log_path=tmp_path / "gateway.log"),
    ):
        for name in ("redis", "worker", "gateway"):
            env = {**os.environ, **environment(name)}
            done = subprocess.run(healthcheck(name), env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{name} healthcheck failed: {done.stdout} {done.stderr}"
            assert "NOAUTH" not in done.stdout, f"{name} healthcheck: {done.stdout}"

        # Only the gateway gets in behind it: the worker wants its token, Redis its password.
        assert httpx.post(f"{worker_url}/embed", content=b"", timeout=10).status_code == 401
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).dbsize()

        body = {"model": "minilm-l6", "input": ["compose wiring", "second input"]}
        assert httpx.post(f"{gateway_url}/v1/embeddings", json=body, timeout=30).status_code == 401
        headers = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(f"{gateway_url}/v1/embeddings", json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        assert [len(item["embedding"]) for item in answer.json()["data"]] == [384, 384]
        client, deadline = redis.Redis(port=redis_port, password=redis_password), time.monotonic() + 10
        while client.dbsize() == 0:  # the gateway writes the cache after it answers
            assert time.monotonic() < deadline, "the gateway did not cache in the compose Redis"
            time.sleep(0.05)

        # Every metric the Grafana dashboard plots is one that gateway or worker exports.
        exported = metric_families(httpx.get(f"{gateway_url}/metrics", headers=headers, timeout=10).text)
        exported |= metric_families(httpx.get(f"{worker_url}/metrics", timeout=10).text)
        assert dashboard_metrics() - exported == set()
