"""Templates, tokenization, truncation and validation of one input: the worker's side of an item (the request
rules themselves live in rules.py, which the gateway checks too).

The one place that turns an EmbedItem into token ids, so serving and training format text the
same way. Truncation cuts the body (the caller's text), never the template around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from common import protocol, rules
from common.methods.base import TEXT_SLOT
from common.protocol import EmbedItem
from common.rules import ItemRejected
from model_server.sequence import Params
from model_server.specs import ModelSpec


@dataclass
class PreparedInput:
    """An input ready for the engine (`sequence.Prepared`). The engine copies what it runs (`sequence.as_input`):
    the tokens, the budget and `params`, the request options compute code reads, typed; `item` stays here."""

    token_ids: list[int]
    steps: int
    truncated: bool
    token_type_ids: list[int] | None = None  # segment ids of a (query, document) pair
    reserve: int = 0  # KV positions beyond prompt + steps (o1: the EOS and <emb> after a thought)
    trajectory: bool = False  # keep the embedding after every step
    samples: int = 1  # sequences this input runs as, their vectors combined (o1: its sampled thoughts)
    sample: int = 0  # which of them this sequence is
    item: EmbedItem = field(default_factory=EmbedItem)  # the validated request item

    @property
    def params(self) -> Params:
        item = self.item
        return Params(tolerance=item.tolerance, seed=item.seed, sample=self.sample, trajectory=self.trajectory)


def format_prompt(spec: ModelSpec, input_type: str, instruction: str | None, steps: int = 0) -> tuple[str, str]:
    """(prefix, suffix) around the body for this input type, instruction and K. An empty instruction takes
    the space after it along (DEBATER's `{instruction} {text}` is then the bare text, as in its code); a
    debater document's suffix ends with its first K deliberation tokens, tokenized with the rest."""
    template = spec.templates.for_type(input_type)  # type: ignore[arg-type]
    instruction = spec.default_instruction if instruction is None else instruction
    if not instruction:
        template = template.replace("{instruction} ", "")
    prefix, _, suffix = template.replace("{instruction}", instruction).partition(TEXT_SLOT)
    if spec.facts.deliberates and input_type == "document":
        suffix += "".join(spec.deliberation_tokens[:steps])
    return prefix, suffix


class PromptBuilder:
    def __init__(self, spec: ModelSpec, tokenizer, vocab_size: int) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._special_head, self._special_tail = self._special_frame() if spec.add_special_tokens else ([], [])
        self._specials = len(self._special_head) + len(self._special_tail)
        if spec.facts.emb_token is not None and tokenizer.eos_token_id is None:
            raise ValueError(f"method {spec.method!r} needs a tokenizer with an EOS token")
        if spec.facts.deliberates:
            self._check_deliberation()

    def _check_deliberation(self) -> None:
        """The vector and the trajectory are the last K states: the deliberation tokens must end a document's
        ids, one token each (a tokenizer that appends EOS, or splits a token, would shift them)."""
        tokens = self.spec.deliberation_tokens
        ids = self._encode("probe" + format_prompt(self.spec, "document", None, len(tokens))[1])
        if ids[-len(tokens) :] != self.tokenizer.convert_tokens_to_ids(tokens):
            raise ValueError(f"the deliberation tokens {tokens} do not end a document's token ids one token each")

    def prepare(self, item: EmbedItem) -> PreparedInput:
        if (item.text is None) == (item.token_ids is None):
            raise ItemRejected(protocol.INVALID_INPUT, "give exactly one of text or token ids", "input")
        if item.input_type not in ("query", "document"):
            raise ItemRejected(protocol.INVALID_INPUT, "input_type must be 'query' or 'document'", "input_type")
        steps = rules.check_steps(self.spec.id, self.spec, item.steps)
        rules.check_step_range(self.spec.id, self.spec, item.min_steps, steps)
        rules.check_step_options(self.spec.id, self.spec.method, item.tolerance, item.trajectory)
        if self.spec.facts.scores_pairs:
            return self._pair(item)
        if item.text_pair is not None:
            raise ItemRejected(protocol.INVALID_INPUT, "text_pair is only for cross_encoder models", "input")
        samples = self._samples(item, steps)
        tail, steps, reserve = self._tail(item.input_type, steps)
        prefix, suffix = format_prompt(self.spec, item.input_type, item.instruction, steps)
        if item.text is not None:
            if not item.text:
                raise ItemRejected(protocol.EMPTY_INPUT, "input must not be an empty string", "input")
            ids, truncated = self._text_ids(prefix, item.text, suffix, item.truncate, tail)
        else:
            ids, truncated = self._token_ids(prefix, item.token_ids or [], suffix, item.truncate, tail)
        return PreparedInput(
            token_ids=ids,
            steps=steps,
            truncated=truncated,
            reserve=reserve,
            trajectory=item.trajectory,
            samples=samples,
            item=item,
        )

    def with_steps(self, prepared: PreparedInput, steps: int) -> PreparedInput:
        """`prepared` (a step range's highest) granted `steps` of its range. Only the budget changes where the
        prompt does not depend on K (gircse; an o1 thought of one token or more); else the item is prepared again."""
        if steps == prepared.steps:
            return prepared
        fixed_from = self.spec.facts.prompt_fixed_from
        if fixed_from is not None and min(steps, prepared.steps) >= fixed_from:
            return replace(prepared, steps=steps)
        return self.prepare(replace(prepared.item, steps=steps, min_steps=None))

    def _samples(self, item: EmbedItem, steps: int) -> int:
        """The sequences an input runs as: an o1 query's sampled thoughts; one wherever nothing is random."""
        spec = self.spec
        rules.check_sampling(spec.id, spec, item.seed, item.samples)
        if not spec.facts.samples_thoughts:
            return 1
        samples = spec.thought_samples if item.samples is None else item.samples
        stochastic = item.input_type == "query" and steps > 0 and spec.thought_temperature > 0
        return samples if stochastic else 1

    def _tail(self, input_type: str, steps: int) -> tuple[list[int], int, int]:
        """The method's token ids after the template (never truncated), the steps this input takes and
        the KV positions reserved beyond them.

        o1: documents end with `<emb>`; a query's thought (K decode steps) is followed by EOS and
        `<emb>` (2 more), or with K = 0 both join the prompt. debater: a document's K deliberation
        tokens end its template (`format_prompt`), all in one pass; queries deliberate not (K = 0).
        """
        method, eos = self.spec.facts, self.tokenizer.eos_token_id
        if method.emb_token is not None:
            emb = self.tokenizer.convert_tokens_to_ids(method.emb_token)
            if input_type == "document":
                return [emb], 0, 0
            return ([], steps, 2) if steps else ([eos, emb], 0, 0)
        if method.deliberates and input_type == "query":
            return [], 0, 0
        return [], steps, 0

    def _pair(self, item: EmbedItem) -> PreparedInput:
        """A (query, document) pair for a cross-encoder; only the document is ever truncated."""
        if not item.text or not item.text_pair:
            raise ItemRejected(protocol.EMPTY_INPUT, "a cross-encoder needs a non-empty query and document", "input")
        full = self.tokenizer(item.text, item.text_pair)
        limit = self.spec.max_input_tokens
        truncated = len(full["input_ids"]) > limit
        if truncated and not item.truncate:
            raise self._too_long(len(full["input_ids"]))
        if truncated:
            full = self.tokenizer(item.text, item.text_pair, truncation="only_second", max_length=limit)
        return PreparedInput(
            token_ids=full["input_ids"], steps=0, truncated=truncated, token_type_ids=full.get("token_type_ids")
        )

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS] … [SEP], BOS …),
        read off a probe, so token-id inputs get the same frame as text (any tokenizer class)."""
        plain = self.tokenizer("probe", add_special_tokens=False)["input_ids"]
        framed = self.tokenizer("probe", add_special_tokens=True)["input_ids"]
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[:start], framed[start + len(plain) :]
        raise ValueError("cannot locate the text among the tokenizer's special tokens")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.spec.add_special_tokens)["input_ids"]

    def _too_long(self, n: int) -> ItemRejected:
        return ItemRejected(
            protocol.INPUT_TOO_LONG,
            f"input has {n} tokens, more than the {self.spec.max_input_tokens} model "
            f"{self.spec.id!r} accepts; shorten it or set truncate=true",
            "input",
        )

    def _text_ids(self, prefix: str, body: str, suffix: str, truncate: bool, tail: list[int]) -> tuple[list[int], bool]:
        limit = self.spec.max_input_tokens - len(tail)
        # The whole prompt is tokenized in one go, as the research code does.
        ids = self._encode(prefix + body + suffix)
        if len(ids) <= limit:
            return ids + tail, False
        if not truncate:
            raise self._too_long(len(ids) + len(tail))
        enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        keep = len(offsets) - (len(ids) - limit)
        while keep > 0:
            cut = body[: offsets[keep - 1][1]]
            ids = self._encode(prefix + cut + suffix)
            if len(ids) <= limit:
                return ids + tail, True
            keep -= len(ids) - limit
        raise ItemRejected(protocol.INPUT_TOO_LONG, "the prompt template alone exceeds max_input_tokens", "input")

    def _token_ids(
        self, prefix: str, body: list[int], suffix: str, truncate: bool, tail: list[int]
    ) -> tuple[list[int], bool]:
        if not body:
            raise ItemRejected(protocol.EMPTY_INPUT, "input must not be an empty token list", "input")
        rules.check_token_ids(self.spec.id, body, self.vocab_size)
        tok = self.tokenizer
        head = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        after = tok(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        frame = len(head) + len(after) + self._specials + len(tail)
        room = self.spec.max_input_tokens - frame
        truncated = len(body) > room
        if truncated and not truncate:
            raise self._too_long(len(body) + frame)
        ids = self._special_head + head + body[: max(room, 0)] + after + self._special_tail
        return ids + tail, truncated
