"""An mteb 2.x encoder that embeds through a running genembed gateway, so any mteb task measures what the service
serves (its cache, batching and refinement steps included) rather than a re-implementation of the model.

    import mteb
    from evaluation.mteb_model import GenembedEncoder

    model = GenembedEncoder("smollm2-gircse", base_url="http://127.0.0.1:8000", refinement_steps=5)
    mteb.evaluate(model, mteb.get_tasks(["STSBenchmark"]), cache=None)
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from common.protocol import InputType

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import Array, BatchedInput, PromptType
    from torch.utils.data import DataLoader

RefinementSteps = int | Literal["auto"]
_RETRY_STATUS = {429, 503}  # the gateway's "try again later" answers, with a Retry-After


class GenembedEncoder(AbsEncoder):
    """Embeds mteb's inputs with POST /v1/embeddings of a genembed gateway.

    - Queries and documents go as `input_type` "query" / "document" from mteb's prompt type; symmetric tasks
      (STS, clustering: no prompt type) use `symmetric_input_type`.
    - `refinement_steps`: K for every input (None: the model's default), or "auto" with `refinement_tolerance`;
      with "auto" the steps each input ran are collected in `steps_ran`.
    - `use_instructions`: send mteb's task instruction as the queries' `instruction` (else the model's default).
    - Inputs go in requests of `batch_size`, `concurrency` of them in flight (the gateway coalesces them further);
      429/503 answers are retried after their Retry-After, up to `max_retries` times.
    """

    def __init__(
        self,
        model_name: str,
        revision: str | None = None,
        *,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        refinement_steps: RefinementSteps | None = None,
        refinement_tolerance: float | None = None,
        symmetric_input_type: InputType = "document",
        use_instructions: bool = False,
        batch_size: int = 32,
        concurrency: int = 4,
        timeout_s: float = 300.0,
        max_retries: int = 5,
        device: str | None = None,  # mteb's protocol passes it; the gateway decides where models run
        **kwargs: Any,
    ) -> None:
        if refinement_tolerance is not None and refinement_steps != "auto":
            raise ValueError('refinement_tolerance only applies with refinement_steps="auto"')
        self.model_name = model_name
        self.refinement_steps = refinement_steps
        self.refinement_tolerance = refinement_tolerance
        self.symmetric_input_type = symmetric_input_type
        self.use_instructions = use_instructions
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.steps_ran: list[int] = []
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        card = self._http.get(f"/v1/models/{model_name}")
        card.raise_for_status()  # an unknown model fails here, not in the middle of a task
        info = card.json()
        k = "default" if refinement_steps is None else refinement_steps
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": f"genembed/{model_name}",
                "revision": revision or f"{info.get('revision') or 'unknown'}-k{k}",
                "embed_dim": info.get("dimension"),
                "max_tokens": info.get("max_input_tokens"),
                "modalities": ["text"],
                "similarity_fn_name": ScoringFunction.COSINE,
            }
        )

    def close(self) -> None:
        self._http.close()

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> Array:
        texts = [text for batch in inputs for text in batch["text"]]
        input_type: InputType = prompt_type.value if prompt_type is not None else self.symmetric_input_type  # type: ignore[assignment]
        instruction = None
        if self.use_instructions and input_type == "query":
            instruction = self.get_task_instruction(task_metadata, prompt_type) or None
        chunks = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            parts = list(pool.map(lambda chunk: self.embed(chunk, input_type, instruction), chunks))
        return np.concatenate(parts) if parts else np.zeros((0, self.mteb_model_meta.embed_dim or 0), np.float32)

    def embed(self, texts: list[str], input_type: InputType, instruction: str | None = None) -> np.ndarray:
        """One /v1/embeddings request: (len(texts), dimension) float32, in order."""
        body: dict[str, Any] = {
            "model": self.model_name,
            "input": texts,
            "input_type": input_type,
            "encoding_format": "base64",
        }
        if self.refinement_steps is not None:
            body["refinement_steps"] = self.refinement_steps
        if self.refinement_tolerance is not None:
            body["refinement_tolerance"] = self.refinement_tolerance
        if instruction is not None:
            body["instruction"] = instruction
        for attempt in range(self.max_retries + 1):
            response = self._http.post("/v1/embeddings", json=body)
            if response.status_code not in _RETRY_STATUS or attempt == self.max_retries:
                break
            time.sleep(float(response.headers.get("retry-after", 1)))
        if response.status_code != 200:
            raise RuntimeError(f"{self.model_name}: /v1/embeddings answered {response.status_code}: {response.text}")
        data = sorted(response.json()["data"], key=lambda item: item["index"])
        self.steps_ran.extend(item["refinement_steps"] for item in data if "refinement_steps" in item)
        return np.stack([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data])
