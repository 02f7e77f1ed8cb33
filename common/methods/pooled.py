"""Pooled encoders (sentence-transformers style): the text in the tokenizer's frame, one pass, the final states
pooled as the spec says (mean by default)."""

from common.methods.base import RAW, MethodFacts

FACTS = MethodFacts(
    name="pooled", templates=RAW, add_special_tokens=True, pooling="mean", fixed_pooling=False, cpu_bf16=True
)
