"""Each method's facts, one torch-free module per method: its defaults, prompts, tokens and request rules, and
what it is (generates, scores pairs, ...). Serving, loading, the rules and the gateway ask these facts, never the
method's name; what a method computes lives in model_server/methods/.

Adding a method: a facts module here (listed below and in `Method`) and a compute module in
model_server/methods/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from common.methods import cross_encoder, debater, gircse, o1, pooled
from common.methods.base import MethodFacts

Method = Literal["gircse", "pooled", "cross_encoder", "o1", "debater"]

_FACTS: dict[str, MethodFacts] = {m.FACTS.name: m.FACTS for m in (gircse, pooled, cross_encoder, o1, debater)}
METHODS: tuple[str, ...] = get_args(Method)


def facts(method: str) -> MethodFacts:
    try:
        return _FACTS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}") from None


def which(has: Callable[[MethodFacts], bool]) -> str:
    """The methods with a fact, for messages ("only for gircse models")."""
    return " and ".join(name for name in METHODS if has(_FACTS[name]))
