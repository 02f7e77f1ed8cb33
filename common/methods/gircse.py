"""GIRCSE (arXiv 2509.24291, Roytsai27/GIRCSE): an instruction template for queries, raw documents, no special
tokens; K soft-token steps, the vector the mean of the K step states (K = 0: of the prompt's states)."""

from common.methods.base import TEXT_SLOT, MethodFacts

FACTS = MethodFacts(
    name="gircse",
    templates={"query": "Instruct: {instruction}\nQuery:{text}", "document": TEXT_SLOT},
    default_instruction="Given a query, retrieve relevant passages that answer the query",
    pooling="mean",
    max_refinement_steps=20,
    default_refinement_steps=5,
    generates=True,
    soft_tokens=True,
    early_exit=True,
    prompt_fixed_from=0,
)
