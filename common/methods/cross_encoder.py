"""Cross-encoders: a (query, document) pair in the tokenizer's frame, one pass, the classification head's raw
logits out (no vector to normalise)."""

from common.methods.base import RAW, MethodFacts

FACTS = MethodFacts(
    name="cross_encoder", templates=RAW, add_special_tokens=True, normalize=False, scores_pairs=True, cpu_bf16=True
)
