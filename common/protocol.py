"""The gateway <-> worker wire format, shared by both sides (numpy and msgpack only, never torch).

`POST /embed` request body: msgpack map `{"request_id": str | None, "items": [item, ...]}`, plus
`deadline_s` (seconds left to the request's deadline when the call left the gateway; absent: none) and
`priority` (`online`, or `batch`: runs only in the capacity online work leaves, never refused for load).
A call is one gateway request's inputs: the worker admits it whole or refuses it (429 with Retry-After).

Every /embed answer, refusals included, and `GET /load` carry the worker's backlog in the headers
`x-genembed-drain-s` (expected seconds until the work it holds is done) and `x-genembed-queued-seqs`.
A 429 from admission also says how long its decision holds: `x-genembed-refusal-holds-s`, the seconds during which
a call at least as heavy (no fewer sequences, steps or prompt tokens, and no longer a deadline) would be refused
too, and `x-genembed-refusal-holds-for: any` when any call would be (the queue alone outlasts the deadline). The
gateway remembers it, so it does not send the worker calls it would refuse (service/workers.py, `Refusal`).

Response body (content type `application/x-genembed`):

    4 bytes   little-endian uint32 N: length of the header
    N bytes   msgpack header: {"dimension": D, "results": [result, ...]}
    rest      float32 little-endian vectors, D values each, in the order of the results: for every
              result *without* an error its vector, then its `trajectory` rows (the embedding
              after each step 1..K, when the item asked for them)

An item fails on its own (its result carries `error`); the others in the batch still succeed.

Fields added since the first version (`_ADDED`) are left out while at their defaults, so a gateway and a
worker one version apart still serve every request that does not use them (rolling upgrades); one that
does reaches an older worker as a 400 naming the unknown field.
Whole-request failures (queue full, shutting down) are HTTP statuses with a JSON `detail`.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Literal

import msgpack
import numpy as np

CONTENT_TYPE = "application/x-genembed"
REQUEST_CONTENT_TYPE = "application/msgpack"
REQUEST_ID_HEADER = "x-request-id"
DRAIN_HEADER = "x-genembed-drain-s"
QUEUED_HEADER = "x-genembed-queued-seqs"
REFUSAL_HOLDS_HEADER = "x-genembed-refusal-holds-s"
REFUSAL_HOLDS_FOR_HEADER = "x-genembed-refusal-holds-for"
# The shared secret the gateway sends on every worker call (model_server/auth.py checks it).
WORKER_TOKEN_HEADER = "x-genembed-worker-token"

Priority = Literal["online", "batch"]
_HEADER_LEN = struct.Struct("<I")

InputType = Literal["query", "document"]

# Per-item error codes; the gateway maps each to a 400 with the same message.
STEPS_OUT_OF_RANGE = "steps_out_of_range"
EMPTY_INPUT = "empty_input"
INPUT_TOO_LONG = "input_too_long"
TOKEN_OUT_OF_VOCAB = "token_out_of_vocabulary"
INVALID_INPUT = "invalid_input"
INTERNAL_ERROR = "internal_error"
# Whole-call refusals (JSON body {"detail", "code"}): the call can never finish within its deadline, even on an
# idle worker (400: fewer inputs or steps, or a step range, would fit), and an item dropped past its deadline.
EXCEEDS_DEADLINE = "exceeds_deadline"
DEADLINE_PASSED = "deadline_exceeded"
# A 429's code: admitted now, the call would finish past its deadline (Retry-After: once enough has drained).
OVERLOADED = "overloaded"


@dataclass
class EmbedItem:
    """One input: exactly one of `text` / `token_ids`. `steps=None` takes the model's default K.

    For `cross_encoder` models `text` is the query and `text_pair` the document to score.
    `o1` queries sample `samples` thoughts (None: the model's default) from `seed` (None: a fixed
    default, so a repeated request gives the same vector); other methods ignore `seed`.
    `tolerance` (gircse only) lets a sequence stop before `steps` once another step moves its
    embedding by less than it (1 - cos); `trajectory` asks for the embedding after every step too.
    `min_steps` makes `min_steps..steps` a range: the worker grants the most steps its queue allows.
    """

    text: str | None = None
    text_pair: str | None = None
    token_ids: list[int] | None = None
    input_type: InputType = "query"
    instruction: str | None = None
    steps: int | None = None
    truncate: bool = True
    seed: int | None = None
    samples: int | None = None
    tolerance: float | None = None
    trajectory: bool = False
    min_steps: int | None = None


@dataclass
class EmbedRequest:
    items: list[EmbedItem]
    request_id: str | None = None
    deadline_s: float | None = None  # seconds left to the request's deadline; None: no deadline
    priority: Priority = "online"

    def encode(self) -> bytes:
        body = {"request_id": self.request_id, "items": [_fields(i) for i in self.items]}
        if self.deadline_s is not None:
            body["deadline_s"] = self.deadline_s
        if self.priority != "online":
            body["priority"] = self.priority
        return msgpack.packb(body)

    @classmethod
    def decode(cls, body: bytes) -> EmbedRequest:
        """Raises ValueError on a malformed body (the worker answers 400)."""
        try:
            data = msgpack.unpackb(body)
            items = [EmbedItem(**item) for item in data["items"]]
            priority = data.get("priority", "online")
            if priority not in ("online", "batch"):
                raise ValueError(f"unknown priority {priority!r}")
            deadline_s = data.get("deadline_s")
            if deadline_s is not None and not isinstance(deadline_s, int | float):
                raise ValueError("deadline_s must be a number")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ValueError(f"malformed embed request: {exc}") from exc
        return cls(items=items, request_id=data.get("request_id"), deadline_s=deadline_s, priority=priority)


@dataclass
class ItemError:
    code: str
    message: str
    param: str | None = None


@dataclass
class ItemResult:
    prompt_tokens: int = 0
    steps: int = 0  # steps that ran (fewer than asked when a tolerance stopped it early)
    truncated: bool = False
    error: ItemError | None = None
    trajectory: int = 0  # trajectory rows that follow the item's vector


@dataclass
class EmbedResponse:
    dimension: int
    results: list[ItemResult]
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def encode(self) -> bytes:
        header = msgpack.packb({"dimension": self.dimension, "results": [_fields(r) for r in self.results]})
        payload = np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()
        return _HEADER_LEN.pack(len(header)) + header + payload

    @classmethod
    def decode(cls, body: bytes) -> EmbedResponse:
        (n,) = _HEADER_LEN.unpack_from(body)
        header = msgpack.unpackb(body[_HEADER_LEN.size : _HEADER_LEN.size + n])
        results = []
        for r in header["results"]:
            error = r.pop("error")
            results.append(ItemResult(**r, error=ItemError(**error) if error else None))
        dim = header["dimension"]
        vectors = np.frombuffer(body, dtype="<f4", offset=_HEADER_LEN.size + n).reshape(-1, dim)
        if len(vectors) != sum(1 + r.trajectory for r in results if r.error is None):
            raise ValueError("embed response: vector count does not match the successful items")
        return cls(dimension=dim, results=results, vectors=vectors)

    def outputs(self) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per result, (its vector, its trajectory rows [steps, D]) or None where the item failed."""
        outputs: list[tuple[np.ndarray, np.ndarray] | None] = []
        row = 0
        for r in self.results:
            if r.error is not None:
                outputs.append(None)
                continue
            outputs.append((self.vectors[row], self.vectors[row + 1 : row + 1 + r.trajectory]))
            row += 1 + r.trajectory
        return outputs


#: fields added after the first version, and their defaults: left out of a message while at them
_ADDED = {
    "tolerance": None,
    "trajectory": False,
    "min_steps": None,
    "runner": "fast",
    "calibration": [],
    "max_thought_samples": None,
}


def _fields(value: EmbedItem | ItemResult | ModelInfo) -> dict:
    return {k: v for k, v in asdict(value).items() if k not in _ADDED or v != _ADDED[k]}


@dataclass
class ModelInfo:
    """`GET /info`: what the gateway needs to validate requests and build cache keys."""

    id: str
    method: str
    dimension: int
    min_refinement_steps: int
    max_refinement_steps: int
    default_refinement_steps: int
    max_input_tokens: int
    vocab_size: int
    dtype: str
    device: str
    revision: str
    #: which path runs the model's passes: "fast", genembed's batched runner (llama, mistral, qwen2, qwen3
    #: decoders), or "hf", the model's own Hugging Face forward (other families; one-pass encoders)
    runner: Literal["fast", "hf"] = "fast"
    #: timed warm-up calls, [calls, inputs, prompt tokens, steps, seconds] each (admission now happens in the worker,
    #: which fits its own iterations; kept for gateways older than that)
    calibration: list[list[float]] = field(default_factory=list)
    #: o1: the most thoughts a request may sample per input (`samples`), so the gateway checks the range the worker
    #: does (common/rules.py); None for other methods, and from a worker older than the field
    max_thought_samples: int | None = None

    def to_json(self) -> dict:
        """The `/info` body, `_ADDED` fields left out at their defaults (an older gateway reads it)."""
        return _fields(self)
