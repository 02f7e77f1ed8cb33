"""A spec file naming only its method serves that method's own prompts, special tokens and step range."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.protocol import EmbedItem
from model_server.loading import load_model
from model_server.prompts import PromptBuilder
from model_server.specs import ModelSpec, load_spec
from tests.models import make_tiny_decoder

TEXT = "How do solar panels work?"
# Each method's prompts as its research code writes them (written out here, not taken from the specs).
EXPECTED = {
    "gircse": (
        "Instruct: Given a query, retrieve relevant passages that answer the query\nQuery:" + TEXT,
        TEXT,
        False,
        (0, 20, 5),
    ),
    "o1": (f"<query>{TEXT}</query><thought>", TEXT + "<emb>", False, (0, 128, 128)),
    "debater": (
        f"Given a web search query, retrieve relevant passages that answer the query: {TEXT}</s>",
        TEXT
        + " Use eight words to represent the above text in multiple aspects: "
        + "".join(f"<reserved_{i}>" for i in range(12, 20)),
        True,
        (1, 8, 8),
    ),
    "pooled": (TEXT, TEXT, True, (0, 0, 0)),
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    """A tiny llama whose tokenizer puts BOS first, so the special-token choice shows in the ids."""
    directory = make_tiny_decoder("llama", tmp_path_factory.mktemp("llama"))
    AutoTokenizer.from_pretrained(directory, add_bos_token=True).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_a_spec_naming_only_its_method_gets_the_methods_prompts(method, backbone, tmp_path):
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(f'id = "m"\nbackbone = "{backbone}"\nmethod = "{method}"\n')
    spec = load_spec(str(spec_file))
    query, document, special, steps = EXPECTED[method]
    assert (spec.min_refinement_steps, spec.max_refinement_steps, spec.default_refinement_steps) == steps
    loaded = load_model(spec)
    builder = PromptBuilder(spec, loaded.tokenizer, loaded.vocab_size)
    for input_type, text in (("query", query), ("document", document)):
        want = loaded.tokenizer(text, add_special_tokens=special)["input_ids"]
        got = builder.prepare(EmbedItem(text=TEXT, input_type=input_type)).token_ids
        assert got == want, (input_type, loaded.tokenizer.convert_ids_to_tokens(got))  # o1: the thought follows
        assert (got[0] == 1) == special  # BOS exactly where the method's reference tokenizes with it


def test_cross_encoder_defaults_and_overrides():
    spec = ModelSpec(id="c", backbone="/x", method="cross_encoder")
    assert (spec.normalize, spec.add_special_tokens, spec.max_refinement_steps) == (False, True, 0)
    # A spec overrides only what it names: one template, the other stays the method's.
    debater = ModelSpec(id="d", backbone="/x", method="debater", templates={"query": "Q: {text}"})
    assert debater.templates.document.startswith("{text} Use eight words")
    assert ModelSpec.model_validate(debater.model_dump()) == debater  # a resolved spec is explicit
    with pytest.raises(ValueError, match=r"1\.\.3 deliberation tokens"):
        ModelSpec(id="d", backbone="/x", method="debater", deliberation_tokens=["[a]", "[b]", "[c]"])
    three = ModelSpec(
        id="d",
        backbone="/x",
        method="debater",
        deliberation_tokens=["[a]", "[b]", "[c]"],
        max_refinement_steps=3,
        default_refinement_steps=3,
    )
    assert three.special_tokens == ("[a]", "[b]", "[c]")
    with pytest.raises(ValueError, match="pools by its own definition"):
        ModelSpec(id="g", backbone="/x", method="gircse", pooling="cls")
