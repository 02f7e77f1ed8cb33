"""The shape of a method's facts: what a method is, apart from what it computes (model_server/methods/).

Stdlib only: the gateway reads these facts (its request rules, its rerank teachers) without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pooling = Literal["mean", "cls", "last"]

# The text placeholder every template must contain exactly once.
TEXT_SLOT = "{text}"
RAW = {"query": TEXT_SLOT, "document": TEXT_SLOT}


@dataclass(frozen=True)
class MethodFacts:
    """One method's defaults, prompts, tokens and request rules. Spec fields left unset take the defaults (the
    research code's own prompts, special-token handling, pooling and step range), so a spec naming only its
    method serves that method as published; the flags are what serving, loading and the rules ask instead of
    the method's name."""

    name: str
    # Spec defaults.
    templates: dict[str, str]  # per input type; `{instruction}` is filled first, the body goes into `{text}`
    default_instruction: str = ""
    add_special_tokens: bool = False  # the tokenizer's own frame (BOS, [CLS] ... [SEP])
    pooling: Pooling = "last"
    fixed_pooling: bool = True  # False: a spec may choose the pooling (pooled models)
    normalize: bool = True
    max_refinement_steps: int = 0
    default_refinement_steps: int = 0
    deliberation_tokens: tuple[str, ...] = ()  # a document's chain of deliberation; a spec may name others
    # What the method is.
    min_refinement_steps: int = 0
    special_tokens: tuple[str, ...] = ()  # the prompts' own tokens, added at load where a tokenizer lacks them
    emb_token: str | None = None  # the token whose state is the vector: ends documents, and queries after EOS
    generates: bool = False  # decodes its steps one by one over a KV cache (a causal LM with its head)
    soft_tokens: bool = False  # its steps feed soft tokens back: the differentiable recursion ICR trains
    scores_pairs: bool = False  # a (query, document) pair in, its raw logits out, no vector
    samples_thoughts: bool = False  # a query runs as several sampled sequences (request `seed`, `samples`)
    early_exit: bool = False  # a vector after each decode step, so `refinement_steps: "auto"` may stop early
    trajectory: bool = True  # `return_trajectory`: the vector after every step
    # The K from which a prompt no longer depends on K, so granting another K of a step range changes only the
    # step budget (None: the prompt always depends on K).
    prompt_fixed_from: int | None = None
    cpu_bf16: bool = False  # bf16 on a CPU with native bf16 (one pass); False: fp32 (a recursion amplifies rounding)

    @property
    def takes_steps(self) -> bool:
        return self.max_refinement_steps > 0

    @property
    def deliberates(self) -> bool:
        """Documents end with the first K deliberation tokens, all in one pass; queries take no steps."""
        return bool(self.deliberation_tokens)
