"""The Dockerfiles, parsed without a Docker engine: pinned bases, non-root, health checks, real commands."""

from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cli.main import build_parser
from harness.procs import REPO

DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The image, its port (CMD --port) and the HEALTHCHECK path.
IMAGES = {"Dockerfile.gateway": "/health", "Dockerfile.worker": "/ready"}
ARG_REF = re.compile(r"\$\{?(\w+)\}?")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [args for kw, args in self.instructions if kw == keyword]
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def expand(self, text: str, overrides: dict[str, str] | None = None) -> str:
        values = {**self.global_args, **(overrides or {})}
        return ARG_REF.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped by stage."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages and keyword == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value.strip('"')
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, not a shell string: {args}"
    return yaml.safe_load(args)


def compose_variants() -> set[str]:
    """The worker VARIANT build argument of every compose file (docker/*.y*ml)."""
    variants = set()
    for path in DOCKER.glob("*compose*.y*ml"):
        for service in (yaml.safe_load(path.read_text()).get("services") or {}).values():
            variant = ((service or {}).get("build") or {}).get("args", {}).get("VARIANT")
            if variant:
                variants.add(variant)
    return variants


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_bases_are_pinned_and_stages_resolve(name: str) -> None:
    dockerfile = parse_dockerfile(DOCKER / name)
    variants = {dockerfile.global_args.get("VARIANT", "")}
    if "VARIANT" in dockerfile.global_args:
        variants |= compose_variants()
    for variant in variants:
        known: set[str] = set()
        for stage in dockerfile.stages:
            base = dockerfile.expand(stage.base, {"VARIANT": variant})
            if base not in known:
                assert "$" not in base, f"{name}: FROM {stage.base} has no default"
                image, _, digest = base.partition("@")
                tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
                assert digest.startswith("sha256:") or (re.search(r"\d", tag) and tag != "latest"), (
                    f"{name}: base image {base} is not pinned to a version tag or digest"
                )
            if stage.name:
                known.add(stage.name)


@pytest.mark.parametrize(("name", "health_path"), sorted(IMAGES.items()))
def test_final_stage_runs_genembed_as_non_root_with_a_healthcheck(name: str, health_path: str) -> None:
    dockerfile = parse_dockerfile(DOCKER / name)
    assert len(dockerfile.stages) >= 2, f"{name} is not multi-stage"
    final = dockerfile.stages[-1]
    user = final.last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), f"{name}: the image must end with a non-root USER"

    cmd = exec_form(final.last("CMD") or "")
    assert cmd[0] in PYPROJECT["project"]["scripts"], f"{name}: {cmd[0]} is not a console script of the project"
    build_parser().parse_args(cmd[1:])  # the subcommand and every flag exist (exits on an unknown one)
    port = cmd[cmd.index("--port") + 1]
    assert final.last("EXPOSE") == port

    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck, f"{name}: no HEALTHCHECK"
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w*)", " ".join(probe))
    assert url and url.groups() == (port, health_path), f"{name}: HEALTHCHECK must poll {health_path} on port {port}"


def test_copied_files_exist_and_pass_dockerignore() -> None:
    """Every COPY source exists and is re-included by the allow-list .dockerignore."""
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for name in IMAGES:
        for stage in parse_dockerfile(DOCKER / name).stages:
            for keyword, args in stage.instructions:
                if keyword != "COPY" or args.startswith("--from"):
                    continue
                *sources, _ = shlex.split(args)
                for source in sources:
                    assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
                    assert source in allowed, f"{name}: COPY {source} is excluded by .dockerignore"


def test_gateway_requirements_match_pyproject() -> None:
    """The gateway image's list (no torch) uses pyproject's own specifiers, so the two cannot drift."""
    core = {dep.replace(" ", "") for dep in PYPROJECT["project"]["dependencies"]}
    lines = (DOCKER / "requirements-gateway.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert requirements
    for requirement in requirements:
        assert requirement in core, f"requirements-gateway.txt: {requirement} is not a core dependency as written"
    assert not any(req.startswith("torch") for req in requirements)
