"""Embedding methods: each turns prepared inputs into vectors, one engine iteration per call.

The engine decides *which* sequences run in an iteration; a method decides *what* that pass
computes for them (plain data both ways: model_server/sequence.py). `build_method` picks the class a spec names.
"""

from __future__ import annotations

from model_server.loading import LoadedModel
from model_server.methods.base import EngineMethod
from model_server.methods.debater import DebaterMethod
from model_server.methods.gircse import GircseMethod
from model_server.methods.o1 import O1Method
from model_server.methods.pooled import CrossEncoderMethod, PooledMethod

__all__ = ["EngineMethod", "build_method"]


def build_method(loaded: LoadedModel, max_seqs: int) -> EngineMethod:
    if loaded.spec.method == "gircse":
        return GircseMethod(loaded, max_seqs)
    if loaded.spec.method == "o1":
        return O1Method(loaded, max_seqs)
    if loaded.spec.method == "debater":
        return DebaterMethod(loaded)
    if loaded.spec.method == "cross_encoder":
        return CrossEncoderMethod(loaded)
    return PooledMethod(loaded)
