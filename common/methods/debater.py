"""DEBATER (arXiv 2502.12974, OpenBMB/DEBATER, its mteb wrapper and training data): BOS from the tokenizer,
documents end with the chain of deliberation (K of its tokens, one pass), queries with the literal `</s>`
(MiniCPM's EOS); the vector is the last token's state, the trajectory the K deliberation states."""

from common.methods.base import MethodFacts

# MiniCPM's own reserved tokens, as the reference prompts use them.
TOKENS = tuple(f"<reserved_{i}>" for i in range(12, 20))

FACTS = MethodFacts(
    name="debater",
    templates={
        "query": "{instruction} {text}</s>",
        "document": "{text} Use eight words to represent the above text in multiple aspects: ",
    },
    default_instruction="Given a web search query, retrieve relevant passages that answer the query:",
    add_special_tokens=True,
    max_refinement_steps=len(TOKENS),
    default_refinement_steps=len(TOKENS),
    deliberation_tokens=TOKENS,
    min_refinement_steps=1,
)
