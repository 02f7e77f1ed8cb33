"""Runs batches: validate the input file, embed each line at batch priority, write results as they come, finish.

Every gateway runs a `BatchRunner`. It looks for active batches every `batch_poll_s` (at once when this gateway
creates one) and takes a batch by writing a lease into its record with a compare-and-swap, so one gateway runs a
batch at a time; the lease is renewed at every checkpoint and lapses `batch_lease_s` after its gateway stops
renewing it (a gateway restarted on the same host and port takes its own leases back at once).

A batch's lines are embedded through the same code as /v1/embeddings (`embed_options`, the Embedder: its cache
is consulted for each line) with priority "batch": the worker runs them only in capacity online work leaves, and
the Embedder waits out load instead of refusing them. At most `batch_max_in_flight` lines per model are in flight
from one gateway. Results are kept in file order: each checkpoint (every `batch_checkpoint_s`, or once
`batch_part_bytes` are buffered) writes the finished lines as new parts of the output and error files, then the
record (`Progress.lines_done`): a runner that takes the batch over after a crash continues at that line and never
redoes or repeats a line already written. Cancelling and expiry are seen at the next checkpoint.

A line's fault (its body, its model, an input over the limit) is its own error-file line; load and worker
restarts are waited out and retried; a server error is retried `_SERVER_ERROR_ATTEMPTS` times, then reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from pydantic import ValidationError

from service.batches.models import (
    ACTIVE,
    BatchError,
    BatchErrors,
    FileObject,
    StoredBatch,
    StoredFile,
)
from service.batches.storage import PreconditionFailed
from service.batches.store import BatchStore, lines
from service.embedder import Embedder
from service.errors import DeadlineExceeded, NotFound, Overloaded, RateLimited, ServiceError, Unavailable
from service.metrics import GatewayMetrics
from service.openai_api import (
    EmbeddingRequest,
    embed_options,
    error_response,
    http_error,
    render_embeddings,
    validation_error,
)
from service.settings import GatewaySettings

log = logging.getLogger(__name__)

#: waited out and retried for as long as the batch runs (the Embedder already waits out load at batch priority)
_TRANSIENT = (Overloaded, RateLimited, Unavailable, DeadlineExceeded)
_SERVER_ERROR_ATTEMPTS = 3
#: errors kept in a failed batch's `errors` (the first ones, in file order)
_MAX_ERRORS = 100
_EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


class LeaseLost(Exception):
    """Another gateway took the batch (this one stopped renewing in time), or the batch is gone."""


class _Stop(Exception):
    """The batch was cancelled or expired: stop running lines and finish it."""


@dataclass
class Line:
    index: int  # among the file's requests (blank lines skipped), 0-based
    number: int  # line of the file, 1-based
    custom_id: str
    body: dict


@dataclass
class LineResult:
    ok: bool
    data: bytes  # the output or error file line, newline included
    model: str  # metrics label: a served model, or "unknown"
    tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Buffer:
    """Finished lines not yet written, and what they add to the batch's counts."""

    output: bytearray = field(default_factory=bytearray)
    errors: bytearray = field(default_factory=bytearray)
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    cached_tokens: int = 0

    def add(self, result: LineResult) -> None:
        if result.ok:
            self.output += result.data
            self.completed += 1
        else:
            self.errors += result.data
            self.failed += 1
        self.tokens += result.tokens
        self.cached_tokens += result.cached_tokens

    @property
    def size(self) -> int:
        return len(self.output) + len(self.errors)


class Job:
    """One batch this gateway holds the lease of: its record, the record's version, and the compare-and-swap."""

    def __init__(self, store: BatchStore, stored: StoredBatch, version: str, owner: str, lease_s: float) -> None:
        self.store = store
        self.stored = stored
        self.version = version
        self.owner = owner
        self.lease_s = lease_s
        self.run = secrets.token_hex(4)  # names this run's parts: a stale runner never overwrites a live one's

    @property
    def id(self) -> str:
        return self.stored.batch.id

    async def save(self, *, release: bool = False) -> None:
        """Write the record and renew (or release) the lease. When another writer came first: keep its cancel and
        write again, or raise LeaseLost if the lease is another gateway's now."""
        progress = self.stored.progress
        progress.lease_owner = None if release else self.owner
        progress.lease_until = 0.0 if release else time.time() + self.lease_s
        while True:
            try:
                self.version = await self.store.write_batch(self.stored, self.version)
                return
            except PreconditionFailed:
                found = await self.store.read_batch(self.id)
                if found is None:
                    raise LeaseLost(self.id) from None
                theirs, self.version = found
                held = theirs.progress.lease_owner in (None, self.owner) or theirs.progress.lease_until < time.time()
                if not held:
                    raise LeaseLost(self.id) from None
                mine = self.stored.batch
                if theirs.batch.status == "cancelling" and mine.status in ("validating", "in_progress"):
                    mine.status, mine.cancelling_at = "cancelling", theirs.batch.cancelling_at

    def check(self) -> None:
        """Raise _Stop if the batch was cancelled or its window has passed."""
        batch = self.stored.batch
        if batch.status == "cancelling" or (batch.expires_at is not None and time.time() >= batch.expires_at):
            raise _Stop


class BatchRunner:
    def __init__(
        self, store: BatchStore, embedder: Embedder, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.store = store
        self.embedder = embedder
        self.settings = settings
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{settings.port}"
        self._slots = {name: asyncio.Semaphore(settings.batch_max_in_flight) for name in embedder.pool.groups}
        self._jobs: dict[str, asyncio.Task] = {}
        self._held: dict[str, Job] = {}
        self._wakeup = asyncio.Event()
        self._loop: asyncio.Task | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._scan_forever(), name="batch-runner")

    def wake(self) -> None:
        """Look for batches now (one was just created here)."""
        self._wakeup.set()

    async def aclose(self) -> None:
        """Stop every batch where it is and release its lease, so another gateway can take it over at once."""
        held = list(self._held.values())
        tasks = [t for t in (self._loop, *self._jobs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in held:
            with contextlib.suppress(LeaseLost, OSError, ServiceError):
                await job.save(release=True)

    async def _scan_forever(self) -> None:
        while True:
            try:
                await self._scan()
            except Exception:
                log.exception("looking for batches failed; trying again in %g s", self.settings.batch_poll_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.settings.batch_poll_s)
            self._wakeup.clear()

    async def _scan(self) -> None:
        statuses = dict.fromkeys(ACTIVE, 0)
        for batch_id in await self.store.active_ids():
            found = await self.store.read_batch(batch_id)
            if found is None or found[0].batch.status not in ACTIVE:
                await self.store.retire(batch_id)
                continue
            stored, version = found
            statuses[stored.batch.status] += 1
            lease = stored.progress
            if batch_id in self._jobs or (
                lease.lease_owner not in (None, self.owner) and lease.lease_until > time.time()
            ):
                continue
            job = Job(self.store, stored, version, self.owner, self.settings.batch_lease_s)
            try:
                await job.save()
            except LeaseLost:
                continue
            self._held[batch_id] = job
            self._jobs[batch_id] = asyncio.create_task(self._run(job), name=f"batch-{batch_id}")
        for status, count in statuses.items():
            self.metrics.batches.labels(status).set(count)

    async def _run(self, job: Job) -> None:
        try:
            if job.stored.batch.status == "validating":
                await self._validate(job)
            if job.stored.batch.status == "in_progress":
                await self._process(job)
            if job.stored.batch.status in ("finalizing", "cancelling"):
                await self._finish(job)
        except LeaseLost:
            log.warning("batch %s: another gateway holds it now; stopped here", job.id)
        except Exception:
            log.exception("batch %s failed here; it is released and taken up again", job.id)
            with contextlib.suppress(Exception):
                await job.save(release=True)
        finally:
            self._held.pop(job.id, None)
            self._jobs.pop(job.id, None)

    # -- the input file -------------------------------------------------------------------------------

    async def _input(self, job: Job) -> StoredFile | None:
        """The batch's input file; None, and the batch failed, if it was deleted."""
        try:
            return await self.store.get_file(job.stored.batch.input_file_id, job.stored.owner)
        except NotFound:
            error = BatchError(code="file_not_found", message="the input file was deleted", param="input_file_id")
            await self._fail(job, [error])
            return None

    async def _lines(self, stored: StoredFile) -> AsyncIterator[tuple[int, bytes]]:
        """The file's non-blank lines with their 1-based numbers."""
        number = 0
        async for raw in lines(self.store.content(stored)):
            number += 1
            if raw.strip():
                yield number, raw

    async def _validate(self, job: Job) -> None:
        """Check every line as OpenAI does (JSON, custom_id unique, method, url, the body as /v1/embeddings would
        parse it): a batch with faulty lines fails as a whole with their errors; else it starts."""
        batch = job.stored.batch
        stored = await self._input(job)
        if stored is None:
            return
        errors: list[BatchError] = []
        seen: set[str] = set()
        total = 0
        renewed = time.monotonic()
        async for number, raw in self._lines(stored):
            total += 1
            error = _check_line(raw, number, batch.endpoint, seen)
            if error is not None and len(errors) < _MAX_ERRORS:
                errors.append(error)
            if time.monotonic() - renewed > self.settings.batch_checkpoint_s:
                await job.save()
                renewed = time.monotonic()
        if total == 0:
            errors.append(BatchError(code="empty_file", message="The batch input file is empty."))
        elif total > self.settings.batch_max_lines:
            message = f"The batch input file has {total} requests; at most {self.settings.batch_max_lines} per batch."
            errors.insert(0, BatchError(code="too_many_tasks", message=message))
        if errors:
            await self._fail(job, errors)
            return
        if batch.status == "cancelling":  # cancelled while validating: finished as cancelled, nothing ran
            return
        batch.request_counts.total = total
        batch.status, batch.in_progress_at = "in_progress", int(time.time())
        await job.save()

    async def _fail(self, job: Job, errors: list[BatchError]) -> None:
        batch = job.stored.batch
        batch.status, batch.failed_at, batch.errors = "failed", int(time.time()), BatchErrors(data=errors)
        await job.save(release=True)
        await self.store.retire(job.id)
        self.metrics.batches_finished.labels("failed").inc()

    async def _requests(self, stored: StoredFile, start: int) -> AsyncIterator[Line]:
        """The input file's requests from index `start` on (it was validated: every line parses)."""
        index = -1
        async for number, raw in self._lines(stored):
            index += 1
            if index >= start:
                request = orjson.loads(raw)
                yield Line(index, number, request["custom_id"], request["body"])

    # -- running --------------------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        """Embed the lines not yet written, `2 x batch_max_in_flight` read ahead at most; write them in order."""
        progress, total = job.stored.progress, job.stored.batch.request_counts.total
        stored = await self._input(job)
        if stored is None:
            return
        results: dict[int, LineResult] = {}
        arrived = asyncio.Event()
        ahead = asyncio.Semaphore(2 * self.settings.batch_max_in_flight)
        running: set[asyncio.Task] = set()

        async def run(line: Line) -> None:
            results[line.index] = await self._line(job, line)
            arrived.set()

        async def read() -> None:
            async for line in self._requests(stored, progress.lines_done):
                await ahead.acquire()
                task = asyncio.create_task(run(line))
                running.add(task)
                task.add_done_callback(running.discard)

        reader = asyncio.create_task(read())
        buffer, written, saved = _Buffer(), progress.lines_done, time.monotonic()
        try:
            job.check()
            while written < total:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), self.settings.batch_checkpoint_s)
                arrived.clear()
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                while written in results:
                    buffer.add(results.pop(written))
                    ahead.release()
                    written += 1
                if time.monotonic() - saved >= self.settings.batch_checkpoint_s or (
                    buffer.size >= self.settings.batch_part_bytes
                ):
                    await self._checkpoint(job, buffer, written)
                    buffer, saved = _Buffer(), time.monotonic()
                    job.check()
            await self._checkpoint(job, buffer, written)
        except _Stop:
            await self._checkpoint(job, buffer, written)
            if job.stored.batch.status != "cancelling":
                await self._expire(job, stored)
            return
        finally:
            for task in (reader, *running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)
        job.stored.batch.status, job.stored.batch.finalizing_at = "finalizing", int(time.time())
        await job.save()

    async def _checkpoint(self, job: Job, buffer: _Buffer, written: int) -> None:
        """Write the buffered lines as new parts, then the record that names them (and renews the lease)."""
        progress, batch = job.stored.progress, job.stored.batch
        output = error = None
        if buffer.output:
            output = await self.store.write_part(
                job.id, f"output-{len(progress.output_parts):06d}-{job.run}", buffer.output
            )
        if buffer.errors:
            error = await self.store.write_part(
                job.id, f"errors-{len(progress.error_parts):06d}-{job.run}", buffer.errors
            )
        if output is not None:
            progress.output_parts.append(output)
            progress.output_bytes += len(buffer.output)
        if error is not None:
            progress.error_parts.append(error)
            progress.error_bytes += len(buffer.errors)
        progress.lines_done = written
        batch.request_counts.completed += buffer.completed
        batch.request_counts.failed += buffer.failed
        batch.usage.input_tokens += buffer.tokens
        batch.usage.total_tokens += buffer.tokens
        batch.usage.input_tokens_details.cached_tokens += buffer.cached_tokens
        await job.save()

    async def _line(self, job: Job, line: Line) -> LineResult:
        """One request, answered as /v1/embeddings would answer it, as an output or error file line."""
        model = line.body.get("model")
        label = model if isinstance(model, str) and model in self._slots else "unknown"
        request_id = f"{job.id}-{line.index}"
        attempt = 0
        while True:
            attempt += 1
            try:
                body = EmbeddingRequest.model_validate(line.body)
                slot = self._slots.get(body.model) or contextlib.nullcontext()
                async with slot:
                    self.metrics.batch_lines_in_flight.labels(label).inc()
                    try:
                        options = embed_options(self.embedder, body, self.settings.max_inputs, priority="batch")
                        result = await self.embedder.embed(body.model, body.inputs(), options, request_id)
                    finally:
                        self.metrics.batch_lines_in_flight.labels(label).dec()
                response = render_embeddings(result, body, {})
                self.metrics.batch_lines.labels(label, "completed").inc()
                cached = result.prompt_tokens if result.cache == "hit" else 0
                data = _result_line(job.id, line, 200, request_id, response.body)
                return LineResult(True, data, label, result.prompt_tokens, cached)
            except ValidationError as exc:  # validated with the file: only if the rules changed since
                error: ServiceError = validation_error(exc.errors())
            except _TRANSIENT as exc:
                self.metrics.batch_line_retries.labels(label).inc()
                await asyncio.sleep(self._backoff(exc, attempt))
                continue
            except ServiceError as exc:
                error = exc
                if http_error(exc)[0] >= 500 and attempt < _SERVER_ERROR_ATTEMPTS:
                    self.metrics.batch_line_retries.labels(label).inc()
                    await asyncio.sleep(self._backoff(exc, attempt))
                    continue
            self.metrics.batch_lines.labels(label, "failed").inc()
            data = _result_line(job.id, line, http_error(error)[0], request_id, error_response(error).body)
            return LineResult(False, data, label)

    def _backoff(self, error: ServiceError, attempt: int) -> float:
        wait = error.retry_after if error.retry_after is not None else 0.25 * 2 ** min(attempt, 6)
        return min(float(wait), self.settings.batch_retry_max_s)

    # -- the end --------------------------------------------------------------------------------------

    async def _expire(self, job: Job, stored: StoredFile) -> None:
        """The window passed: every line not yet answered goes to the error file as `batch_expired`."""
        buffer = _Buffer()
        async for line in self._requests(stored, job.stored.progress.lines_done):
            data = orjson.dumps(
                {"id": _line_id(job.id, line), "custom_id": line.custom_id, "response": None, "error": _EXPIRED}
            )
            buffer.add(LineResult(False, data + b"\n", "unknown"))
            if buffer.size >= self.settings.batch_part_bytes:
                await self._checkpoint(job, buffer, line.index + 1)
                buffer = _Buffer()
        await self._checkpoint(job, buffer, job.stored.batch.request_counts.total)
        job.stored.batch.status = "expired"
        await self._finish(job)

    async def _finish(self, job: Job) -> None:
        """The output and error files from the parts, and the final status (idempotent: the files' ids derive from
        the batch's, so a runner that finishes again after a crash rewrites the same files)."""
        batch, progress, now = job.stored.batch, job.stored.progress, int(time.time())
        suffix = batch.id.removeprefix("batch_")
        for parts, size, kind in (
            (progress.output_parts, progress.output_bytes, "output"),
            (progress.error_parts, progress.error_bytes, "error"),
        ):
            if not parts:
                continue
            file = FileObject(
                id=f"file-{suffix}{kind[0]}",
                bytes=size,
                created_at=now,
                filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output",
            )
            await self.store.put_file(StoredFile(file=file, owner=job.stored.owner, parts=parts))
            if kind == "output":
                batch.output_file_id = file.id
            else:
                batch.error_file_id = file.id
        batch.finalizing_at = batch.finalizing_at or now
        if batch.status == "cancelling":
            batch.status, batch.cancelled_at = "cancelled", now
        elif batch.status == "expired":
            batch.expired_at = now
        else:
            batch.status, batch.completed_at = "completed", now
        await job.save(release=True)
        await self.store.retire(job.id)
        self.metrics.batches_finished.labels(batch.status).inc()
        log.info("batch %s %s: %s", job.id, batch.status, batch.request_counts.model_dump())


def _line_id(batch_id: str, line: Line) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line.index}"


def _result_line(batch_id: str, line: Line, status: int, request_id: str, body: bytes) -> bytes:
    """A line of the output (2xx) or error file, as OpenAI writes them; `body` is the JSON the route answers."""
    response = {"status_code": status, "request_id": request_id, "body": orjson.Fragment(body)}
    record = {"id": _line_id(batch_id, line), "custom_id": line.custom_id, "response": response, "error": None}
    return orjson.dumps(record) + b"\n"


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str]) -> BatchError | None:
    """The first fault of one input line, in OpenAI's error codes; None if it is a valid request."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BatchError(code="invalid_json_line", message="This line is not parseable as valid JSON.", line=number)
    if not isinstance(request, dict):
        return BatchError(code="invalid_json_line", message="This line is not a JSON object.", line=number)
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchError(
            code="missing_required_parameter",
            message="custom_id must be a non-empty string.",
            param="custom_id",
            line=number,
        )
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch."
        )
        return BatchError(code="duplicate_custom_id", message=message, param="custom_id", line=number)
    seen.add(custom_id)
    if request.get("method") != "POST":
        return BatchError(code="invalid_method", message="method must be POST.", param="method", line=number)
    if request.get("url") != endpoint:
        message = f"The URL provided for this request does not match the batch endpoint {endpoint}."
        return BatchError(code="invalid_url", message=message, param="url", line=number)
    extra = set(request) - {"custom_id", "method", "url", "body"}
    if extra:
        message = f"unrecognized field {sorted(extra)[0]!r}"
        return BatchError(code="invalid_request", message=message, param=sorted(extra)[0], line=number)
    try:
        EmbeddingRequest.model_validate(request.get("body"))
    except ValidationError as exc:
        error = validation_error(exc.errors())
        param = f"body.{error.param}" if error.param else "body"
        return BatchError(code="invalid_request", message=error.message, param=param, line=number)
    return None
