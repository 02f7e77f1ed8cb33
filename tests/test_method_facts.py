"""Each method's facts live in one torch-free module (common/methods/<method>.py): every method a spec may name has
one, the gateway reads them without importing torch, and no code outside the method packages branches on a
method's name."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from common.methods import METHODS, Method, facts
from model_server.specs import ModelSpec

REPO = Path(__file__).resolve().parents[1]
# Where a method's name may decide something: its facts and its computation.
METHOD_PACKAGES = (REPO / "common" / "methods", REPO / "model_server" / "methods")


@pytest.mark.parametrize("method", get_args(Method))
def test_every_method_has_its_facts_module(method):
    module = importlib.import_module(f"common.methods.{method}")
    assert module.FACTS is facts(method) and module.FACTS.name == method
    spec = ModelSpec(id="m", backbone="/x", method=method)  # a spec naming only its method takes the facts
    steps = (spec.min_refinement_steps, spec.max_refinement_steps, spec.default_refinement_steps)
    own = module.FACTS
    assert steps == (own.min_refinement_steps, own.max_refinement_steps, own.default_refinement_steps)
    assert (spec.normalize, spec.add_special_tokens, spec.pooling) == (
        own.normalize,
        own.add_special_tokens,
        own.pooling,
    )


def test_the_registry_holds_exactly_the_literal():
    modules = {path.stem for path in (REPO / "common" / "methods").glob("*.py")} - {"__init__", "base"}
    assert modules == set(METHODS) == set(get_args(Method))
    with pytest.raises(ValueError, match="unknown method 'colbert'"):
        facts("colbert")


def test_the_gateway_reads_the_facts_without_torch():
    """Imported in a fresh interpreter: the gateway's app, with the facts and the rules, and no torch stack."""
    probe = (
        "import sys, service.app; "
        "print(sorted(m for m in ('common.methods', 'common.rules', 'torch', 'transformers', 'peft') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["['common.methods',", "'common.rules']"]


def test_no_branch_on_a_methods_name_outside_the_method_packages():
    """`x.method == "o1"`, `method in ("pooled", ...)`: such a branch belongs in the method's facts."""
    names = set(METHODS)
    branches = []
    for folder in ("common", "service", "model_server", "cli", "evaluation", "harness"):
        for path in (REPO / folder).rglob("*.py"):
            if any(path.is_relative_to(package) for package in METHOD_PACKAGES):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Compare) and _names_a_method(node, names):
                    branches.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert branches == []


def _names_a_method(node: ast.Compare, names: set[str]) -> bool:
    sides = [node.left, *node.comparators]
    about_method = any(
        (isinstance(s, ast.Attribute) and s.attr == "method") or (isinstance(s, ast.Name) and s.id == "method")
        for s in sides
    )
    constants = [c for s in sides for c in ([s] if isinstance(s, ast.Constant) else getattr(s, "elts", []))]
    return about_method and any(isinstance(c, ast.Constant) and c.value in names for c in constants)
