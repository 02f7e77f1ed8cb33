"""O1 Embedder (arXiv 2502.07555, RuiranYan/o1embedder): a query's sampled thought of up to K (128) tokens, then
EOS and `<emb>`, whose state is the vector; a document is its text and `<emb>`."""

from common.methods.base import TEXT_SLOT, MethodFacts

EMB_TOKEN = "<emb>"
TOKENS = ("<query>", "</query>", "<thought>", EMB_TOKEN)

FACTS = MethodFacts(
    name="o1",
    templates={"query": "<query>{text}</query><thought>", "document": TEXT_SLOT},
    max_refinement_steps=128,
    default_refinement_steps=128,
    special_tokens=TOKENS,
    emb_token=EMB_TOKEN,
    generates=True,
    samples_thoughts=True,
    trajectory=False,  # a thought has a vector only once it ends
    prompt_fixed_from=1,  # K = 0 puts EOS and `<emb>` into the prompt
)
