"""Hugging Face names that changed inside our supported transformers range (`>=4.56,<6`).

Newer releases rename the KV-cache argument `past_key_values` to `cache` (the old name warns and is removed in
5.40) and `gradient_checkpointing_enable` to `activation_checkpointing_enable` (removed in v6); 4.56 and the
5.17 on the GPU machines know only the old names. Feature detection, not version numbers: the forward's own
signature says which argument it takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


def cache_kwarg(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name `module.forward` takes for its KV cache. Pass a cache you own (e.g.
    `DynamicCache(config=...)`, which the forward fills in place) rather than reading it back from the output,
    whose attribute was renamed too. The name is looked up once per module class: the fallback runner asks on
    every sequence of every step."""
    return {_cache_name(type(module)): cache}


@functools.cache
def _cache_name(module_class: type) -> str:
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Activation (gradient) checkpointing with the non-reentrant torch implementation."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
