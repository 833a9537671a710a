"""HTTP API around a Predictor: a Starlette app, served by uvicorn. No TensorFlow here.

Every client mistake (bad JSON, missing or mistyped fields, empty or oversized requests) gets
a 4xx with a one-line message; model calls run in worker threads so the event loop keeps
reading requests (and answering health checks) while a batch is computed.

Concurrent requests of short texts are batched together (`MicroBatcher`, on by default):
`concurrency` batch workers each take every request waiting when they are free and make one
Predictor call of them, which splits them into length-homogeneous model calls. With two workers
a request that arrives while one batch computes starts at once on the other instead of waiting,
and under load the queue that builds up while both compute becomes the next batches. Requests
of longer texts get their own call in the thread pool (`Batching.max_input_chars`): there the
model's arithmetic, not the per-call overhead, bounds a CPU. bench/serve_load.py measures the
modes against each other and against the in-process ceiling; /metrics shows the batch sizes
that actually form.

A multi-task bundle (one encoder, a head per task) answers /predict bodies that name their task
(`"task": "similarity"`); the micro-batcher merges only requests of the same task (and kind of
input) into one call, and /metadata lists the tasks.

A bundle whose task generates (a decoder LM) is served by POST /generate instead: each request
is one `Predictor.generate` call in the thread pool (its prompts batched together), or with
`"stream": true` a server-sent event stream of the text as tokens come. Generation requests are
not micro-batched: a decoder's steps already batch a request's prompts, and rows of different
requests would wait for each other's prefill and longest continuation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tfsft.errors import ConfigError, DataError, TfsftError
from tfsft.inference import (
    AnyPrediction,
    Generation,
    PrecisionChoice,
    Predictor,
    PromptError,
    TextInput,
    choose_precision,
)
from tfsft.tasks.causal_lm import check_messages
from tfsft.tasks import TASKS


@dataclass(frozen=True)
class Limits:
    """Request limits: they bound the memory and time one request, and all of them, may take.

    `max_queued_texts`: inputs accepted and not yet computed (queued or in a model call) in one
    server process; a request that would pass it gets a 503 with Retry-After at once, so an
    overloaded server sheds load instead of queueing work its clients have given up on.
    `request_timeout_s`: how long a request may wait for its predictions (queue and model
    call) before a 504; None waits as long as it takes. A model call cannot be interrupted
    (onnxruntime runs it in a thread), so the inputs of a timed-out request stay counted in
    `max_queued_texts` until their call ends: the bound, not the timeout, caps the work.
    """

    max_texts: int = 256
    max_chars: int = 10_000
    max_body_bytes: int = 4_000_000
    max_queued_texts: int = 2048
    request_timeout_s: Optional[float] = 30.0

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_chars", "max_body_bytes", "max_queued_texts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a positive integer. Received: {name}={value!r}")
        if self.max_queued_texts < self.max_texts:
            raise ConfigError(
                f"--max_queued_texts must be at least --max_texts, or a request of --max_texts inputs could never "
                f"be taken. Received: max_queued_texts={self.max_queued_texts}, max_texts={self.max_texts}")
        timeout = self.request_timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise ConfigError(
                f"--request_timeout_s must be a positive number of seconds. Received: request_timeout_s={timeout!r}")


@dataclass(frozen=True)
class Batching:
    """Dynamic micro-batching: a batch closes at `max_texts` inputs or `max_wait_ms` after its
    first request, whichever comes first; `concurrency` batches compute at once. The wait is the
    latency added at low load; 0 batches only what queued while earlier batches ran (best on
    CPUs, where a busy worker is never idle).

    Only requests whose inputs all have at most `max_input_chars` characters (a pair counts both
    texts) are batched; longer ones get their own model call in the thread pool. Batching pays
    where the per-call overhead dominates (short texts); on longer texts the model's arithmetic
    does, and concurrent calls keep both cores as busy without making short texts wait behind a
    long batch (bench/serve_load.py measures both sides; the README has the figures). None
    batches every request.
    """

    max_texts: int = 64
    max_wait_ms: float = 0.0
    concurrency: int = 2
    max_input_chars: Optional[int] = 40

    def batches(self, inputs: list[TextInput]) -> bool:
        """Whether a request with these inputs goes to the micro-batcher (else its own call)."""
        if self.max_input_chars is None:
            return True
        return all(_chars(item) <= self.max_input_chars for item in inputs)

    def __post_init__(self) -> None:
        if self.max_texts < 1:
            raise ConfigError(f"--max_batch_texts must be at least 1. Received: max_batch_texts={self.max_texts}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError(f"--max_wait_ms must be in [0, 1000]. Received: max_wait_ms={self.max_wait_ms}")
        if not 1 <= self.concurrency <= 64:
            raise ConfigError(f"--batch_concurrency must be in [1, 64]. Received: batch_concurrency={self.concurrency}")
        if self.max_input_chars is not None and self.max_input_chars < 1:
            raise ConfigError(f"--max_batched_chars must be positive. Received: max_batched_chars={self.max_input_chars}")


def _chars(item: TextInput) -> int:
    return len(item) if isinstance(item, str) else sum(len(text) for text in item)


# ------------------------------------------------------------------------------------ metrics

RETRY_AFTER_S = 1
"""Retry-After of a 503 from a full queue: a batch takes well under a second on a CPU."""
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ServerMetrics:
    """The server's Prometheus metrics (`GET /metrics`, text format 0.0.4).

    With several worker processes (`--workers`), prometheus_client's multiprocess mode sums
    them: `serve` sets PROMETHEUS_MULTIPROC_DIR before the workers start.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tfsft_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("tfsft_errors", "HTTP requests answered with a 4xx or 5xx status, by endpoint and status.",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("tfsft_request_duration_seconds", "Time from request to response, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("tfsft_queue_depth", "Requests waiting for a batch worker.",
                                 multiprocess_mode="livesum", registry=r)
        self.batch_texts = Histogram("tfsft_batch_texts", "Inputs per Predictor call (one micro-batch, or one "
                                     "request without micro-batching).", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("tfsft_batch_requests", "Requests merged into one Predictor call.",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.texts = Counter("tfsft_texts", "Inputs predicted.", registry=r)
        self.texts_per_second = Gauge("tfsft_texts_per_second", f"Inputs predicted per second over the last "
                                      f"{RATE_WINDOW_S:g} s (rate(tfsft_texts_total[1m]) in Prometheus is the same "
                                      "over a minute).", multiprocess_mode="livesum", registry=r)
        self.in_flight = Gauge("tfsft_texts_in_flight", "Inputs accepted and not yet computed (queued or in a model "
                               "call); --max_queued_texts bounds it.", multiprocess_mode="livesum", registry=r)
        self.refused = Counter("tfsft_refused", "/predict requests refused for the server's sake, by reason: "
                               "body_too_large (413), queue_full (503), timeout (504).", ["reason"], registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def observe_call(self, texts: int, requests: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.texts.inc(texts)
        self._recent.append((time.monotonic(), texts))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        self.texts_per_second.set(sum(n for _, n in self._recent) / RATE_WINDOW_S)
        if os.environ.get(MULTIPROCESS_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------------ micro-batching


@dataclass
class _Pending:
    inputs: list[TextInput]
    future: asyncio.Future
    task: Optional[str] = None
    """The task of a multi-task model that answers (None: the model's only one)."""


class MicroBatcher:
    """Collects concurrent /predict requests into Predictor calls and splits the results back.

    `batching.concurrency` worker tasks drain one queue: each takes the first waiting request,
    adds whatever else is waiting (or arrives within the max wait) up to `max_texts` inputs, runs
    the Predictor once per task and kind of input (texts, pairs) in a worker thread, and resolves
    each request's future with its own predictions, in order.
    """

    def __init__(self, predictor: Predictor, batching: Batching, metrics: Optional[ServerMetrics] = None):
        self.predictor = predictor
        self.batching = batching
        self.metrics = metrics
        self._queue: Optional[asyncio.Queue] = None
        self._workers: list[asyncio.Task] = []

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._run_forever()) for _ in range(self.batching.concurrency)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def healthy(self) -> bool:
        """Whether every batch worker is still running (a dead one would leave requests hanging)."""
        return bool(self._workers) and not any(worker.done() for worker in self._workers)

    async def predict(self, inputs: list[TextInput], task: Optional[str] = None) -> list[AnyPrediction]:
        """The predictions of one request (`task`: which task of a multi-task model answers)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(inputs, future, task))
        self._report_depth()
        return await future

    def _report_depth(self) -> None:
        if self.metrics is not None and self._queue is not None:
            self.metrics.queue_depth.set(self._queue.qsize())

    async def _run_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].inputs)
            deadline = loop.time() + self.batching.max_wait_ms / 1000
            while size < self.batching.max_texts:
                try:
                    pending = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        pending = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                batch.append(pending)
                size += len(pending.inputs)
            self._report_depth()
            for group in _by_kind(batch):
                await self._predict_group(group)

    async def _predict_group(self, group: list[_Pending]) -> None:
        """One Predictor call for the group; if it fails, each request alone, so only the culprit fails."""
        inputs = [item for pending in group for item in pending.inputs]
        try:
            predictions = await run_in_threadpool(functools.partial(self.predictor.predict, inputs, task=group[0].task))
        except Exception as error:
            if len(group) == 1:
                _resolve(group[0].future, error=error)
                return
            for pending in group:
                await self._predict_group([pending])
            return
        if self.metrics is not None:
            self.metrics.observe_call(len(inputs), len(group))
        start = 0
        for pending in group:
            _resolve(pending.future, predictions[start : start + len(pending.inputs)])
            start += len(pending.inputs)


def _by_kind(batch: list[_Pending]) -> list[list[_Pending]]:
    """Requests of single texts and of pairs, and of each task, apart: one Predictor call takes
    only one kind of input, for one head."""
    groups: dict[tuple[Optional[str], bool], list[_Pending]] = {}
    for pending in batch:
        groups.setdefault((pending.task, isinstance(pending.inputs[0], str)), []).append(pending)
    return [group for _, group in sorted(groups.items(), key=lambda item: not item[0][1])]  # texts first


def _resolve(future: asyncio.Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class RequestError(Exception):
    """A client mistake, answered with `status` and a one-line message; `refused`: the reason
    counted in tfsft_refused_total, when it is one."""

    def __init__(self, message: str, status: int = 400, refused: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.refused = refused


def _body_too_large(limits: Limits) -> RequestError:
    return RequestError(f"request body exceeds {limits.max_body_bytes} bytes", 413, refused="body_too_large")


class InFlightTexts:
    """Inputs accepted and not yet computed, against `Limits.max_queued_texts`. Used from the
    event loop only (done-callbacks run there), so it needs no lock."""

    def __init__(self, bound: int, gauge=None):
        self.bound = bound
        self.count = 0
        self.gauge = gauge

    def admit(self, texts: int) -> bool:
        if self.count + texts > self.bound:
            return False
        self._add(texts)
        return True

    def release(self, texts: int, work: Optional[asyncio.Future] = None) -> None:
        self._add(-texts)
        if work is not None and not work.cancelled():
            work.exception()  # retrieved: a timed-out request's failure is no "exception never retrieved"

    def _add(self, texts: int) -> None:
        self.count += texts
        if self.gauge is not None:
            self.gauge.set(self.count)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed the limit: from
    Content-Length before reading anything, else while streaming it in (never buffered whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise RequestError(f"invalid Content-Length header: {declared[:40]!r}") from None
        if declared_bytes > limits.max_body_bytes:
            raise _body_too_large(limits)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limits.max_body_bytes:
            raise _body_too_large(limits)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, limits: Limits, task: Optional[str] = None) -> list[Any]:
    """The inputs of a /predict body: a list of texts, of [text, pair] lists, or (question
    answering) of {"question": ..., "context": ...} objects, as (question, context) pairs.
    `task`: the bundle's task; inputs of a kind it does not take are refused.

    Raises:
        RequestError: naming the offending field or item.
    """
    return parse_inputs(parse_payload(body, limits), limits, task)


def parse_payload(body: bytes, limits: Limits) -> dict[str, Any]:
    """The JSON object of a /predict body (its fields not yet checked)."""
    if len(body) > limits.max_body_bytes:
        raise _body_too_large(limits)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"body is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict):
        raise RequestError(
            'body must be a JSON object like {"texts": ["..."]}, {"pairs": [["...", "..."]]} or '
            '{"questions": [{"question": "...", "context": "..."}]}'
        )
    return payload


def parse_inputs(payload: dict[str, Any], limits: Limits, task: Optional[str] = None) -> list[Any]:
    """The inputs of a parsed /predict body (see `parse_request`)."""
    keys = [key for key in INPUT_KEYS if key in payload]
    if task is not None and TASKS[task].generates:
        _check_kind(task, keys[0] if keys else INPUT_KEYS[0])
    if len(keys) != 1:
        raise RequestError('body must have exactly one of the fields "texts", "pairs" or "questions"')
    key = keys[0]
    if task is not None:
        _check_kind(task, key)
    items = payload[key]
    if not isinstance(items, list):
        raise RequestError(f'"{key}" must be a list. Received: {type(items).__name__}')
    if not items:
        raise RequestError(f'"{key}" is empty; send at least one input')
    if len(items) > limits.max_texts:
        raise RequestError(f'"{key}" holds {len(items)} inputs; at most {limits.max_texts} per request', 413)
    for index, item in enumerate(items):
        _check_item(key, index, item, limits)
    if key == "questions":
        return [(item["question"], item["context"]) for item in items]
    return [tuple(item) for item in items] if key == "pairs" else items


INPUT_KEYS = ("texts", "pairs", "questions")
"""The fields a /predict body may hold its inputs in (exactly one)."""


def _check_item(key: str, index: int, item: Any, limits: Limits) -> None:
    if key == "questions":
        if not isinstance(item, dict):
            raise RequestError(f'"questions"[{index}] must be an object with "question" and "context" strings')
        fields = {f'"questions"[{index}].{name}': item.get(name) for name in ("question", "context")}
    else:
        if key == "pairs" and not (isinstance(item, list) and len(item) == 2):
            raise RequestError(f'"pairs"[{index}] must be a list of two strings')
        fields = {f'"{key}"[{index}]': text for text in ([item] if key == "texts" else item)}
    for where, text in fields.items():
        if not isinstance(text, str):
            raise RequestError(f'{where} must be a string. Received: {type(text).__name__}')
        if not text.strip():
            raise RequestError(f'{where} is empty')
        if len(text) > limits.max_chars:
            raise RequestError(f'{where} has {len(text)} characters; at most {limits.max_chars}', 413)


def _check_kind(task: str, key: str) -> None:
    """Refuse inputs of a kind the bundle's task does not take."""
    error = TASKS[task].request_error(key)
    if error is not None:
        raise RequestError(error)


ADAPTER_KEY = "adapter"
"""The /predict field naming which of several served models (`--adapter NAME=RUN`) answers."""
TASK_KEY = "task"
"""The /predict field naming which task of a multi-task model answers."""


def parse_task(payload: dict[str, Any], predictor: Predictor) -> Optional[str]:
    """The task a /predict body names: required (one of the model's) for a multi-task model,
    refused for a model of one task. Raises RequestError naming the field."""
    task = payload.get(TASK_KEY)
    if not predictor.heads:
        if task is not None:
            raise RequestError(f'"{TASK_KEY}" selects a task of a multi-task model; this {predictor.bundle.task} model '
                               f'has one task: send no "{TASK_KEY}". Received: {TASK_KEY}={str(task)[:80]!r}')
        return None
    tasks = list(predictor.heads)
    if task is None:
        raise RequestError(f'name the task in "{TASK_KEY}": this multi-task model\'s tasks are {tasks}')
    if not isinstance(task, str) or task not in predictor.heads:
        raise RequestError(f'unknown "{TASK_KEY}"; this multi-task model\'s tasks are {tasks}. '
                           f"Received: {TASK_KEY}={task!r:.80}")
    return task


@dataclass
class _Served:
    """One model of the app: its predictor, micro-batcher and /metadata entry."""

    predictor: Predictor
    batcher: Optional[MicroBatcher]
    metadata: dict[str, Any]


def _model_metadata(predictor: Predictor, precision: Optional[PrecisionChoice]) -> dict[str, Any]:
    bundle = predictor.bundle
    metadata = {
        "task": bundle.task,
        "labels": list(predictor.labels),
        "model": bundle.metadata.get("model_name"),
        "bundle": str(bundle.directory),
        "model_file": predictor.model_path.name,
        "shared_base": None if predictor.shared_base is None else {
            "model_file": str(predictor.model_path), "adapter_file": str(predictor.adapter_path),
        },
        "precision": precision.to_dict() if precision is not None else None,
        "max_seq_length": bundle.max_seq_length,
        "export_report": bundle.report(),
    }
    if predictor.heads:
        metadata["tasks"] = [
            {"name": name, "task": head.bundle.task, "labels": list(head.labels)} for name, head in predictor.heads.items()
        ]
    if predictor.generates:
        metadata["generation"] = {
            "endpoint": "/generate", "max_new_tokens": predictor.max_new_tokens, "temperature": 0.0, "top_p": 1.0,
            "eos_token_ids": list(predictor.prompt_format.eos_token_ids),
            "chat_template": predictor.prompt_format.chat_template is not None,
        }
    return metadata


# ---------------------------------------------------------------------------------- /generate

GENERATE_FIELDS = ("prompts", "max_new_tokens", "temperature", "top_p", "stop", "seed", "stream")
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class GenerateRequest:
    """A checked /generate body: the prompts, the `Predictor.generate` keyword arguments, and
    whether to stream (one prompt only)."""

    prompts: list[Any]
    settings: dict[str, Any]
    stream: bool


def parse_generate(payload: dict[str, Any], limits: Limits) -> GenerateRequest:
    """The prompts and settings of a parsed /generate body.

    Raises:
        RequestError: naming the offending field, or the prompt's index.
    """
    unknown = sorted(set(payload) - {*GENERATE_FIELDS, ADAPTER_KEY})
    if unknown:
        raise RequestError(f"unknown field(s) {unknown[:5]}: a /generate body takes {list(GENERATE_FIELDS)}")
    prompts = payload.get("prompts")
    if not isinstance(prompts, list):
        raise RequestError('"prompts" must be a list of strings or of chat conversations '
                           f'([{{"role": ..., "content": ...}}]). Received: {type(prompts).__name__}')
    if not prompts:
        raise RequestError('"prompts" is empty; send at least one prompt')
    if len(prompts) > limits.max_texts:
        raise RequestError(f'"prompts" holds {len(prompts)} prompts; at most {limits.max_texts} per request', 413)
    checked = [_check_prompt(index, prompt, limits) for index, prompt in enumerate(prompts)]
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f'"stream" must be true or false. Received: {stream!r:.40}')
    if stream and len(checked) != 1:
        raise RequestError(f'"stream": true takes exactly one prompt. Received: {len(checked)} prompts')
    return GenerateRequest(checked, _generate_settings(payload), stream)


def _check_prompt(index: int, prompt: Any, limits: Limits) -> Any:
    where = f'"prompts"[{index}]'
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list):
        try:
            prompt = check_messages(prompt, where)
        except DataError as error:
            raise RequestError(str(error)) from None
        text = "".join(message["content"] for message in prompt)
    else:
        raise RequestError(f'{where} must be a string or a list of {{"role", "content"}} messages. '
                           f"Received: {type(prompt).__name__}")
    if isinstance(prompt, str) and not text.strip():
        raise RequestError(f"{where} is empty")
    if len(text) > limits.max_chars:
        raise RequestError(f"{where} has {len(text)} characters; at most {limits.max_chars}", 413)
    return prompt


def _generate_settings(payload: dict[str, Any]) -> dict[str, Any]:
    """`Predictor.generate`'s keyword arguments from the body's fields, each type-checked."""
    settings: dict[str, Any] = {}
    new = payload.get("max_new_tokens")
    if new is not None:
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise RequestError(f'"max_new_tokens" must be a positive integer. Received: {new!r:.40}')
        settings["max_new_tokens"] = new
    for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0)):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high or (name == "top_p" and value == 0):
            expected = "a number >= 0 (0: greedy)" if name == "temperature" else "a number in (0, 1]"
            raise RequestError(f'"{name}" must be {expected}. Received: {value!r:.40}')
        settings[name] = float(value)
    stop = payload.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS:
            raise RequestError(f'"stop" must be a string or a list of at most {MAX_STOP_STRINGS} strings. '
                               f"Received: {stop!r:.60}")
        for index, value in enumerate(stops):
            if not isinstance(value, str) or not value:
                raise RequestError(f'"stop"[{index}] must be a non-empty string. Received: {value!r:.40}')
        settings["stop"] = tuple(stops)
    seed = payload.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise RequestError(f'"seed" must be an integer >= 0 or null. Received: {seed!r:.40}')
        settings["seed"] = seed
    return settings


def _generation_error(error: TfsftError) -> RequestError:
    """A request the model cannot take (a prompt too long for it, too many new tokens) as a 400."""
    if isinstance(error, PromptError):
        return RequestError(f'"prompts"[{error.index}] {error.detail}')
    return RequestError(" ".join(str(error).split()))


def _sse(event: Any) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def create_app(
    predictor: Predictor | dict[str, Predictor],
    limits: Optional[Limits] = None,
    batching: Optional[Batching] = None,
    metrics: Optional[ServerMetrics] = None,
    precision: Optional[PrecisionChoice | dict[str, PrecisionChoice]] = None,
) -> Starlette:
    """The ASGI app: POST /predict (or POST /generate for a model that generates), GET /health,
    GET /metadata, GET /metrics.

    `predictor`: one Predictor, or several by name (LoRA adapters of one base, say, each a merged
    bundle): a request then names its model in "adapter" (optional when only one is served), and
    /metadata lists them under "adapters".
    `batching=None`: one Predictor call per request, run concurrently in a thread pool.
    `precision`: how each predictor's model was chosen (shown in /metadata).
    """
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    named = isinstance(predictor, dict)
    predictors = predictor if named else {"default": predictor}
    if not predictors:
        raise ConfigError("create_app needs at least one predictor")
    choices = precision if isinstance(precision, dict) else {name: precision for name in predictors}
    served = {
        name: _Served(
            model, MicroBatcher(model, batching, metrics) if batching is not None and not model.generates else None,
            _model_metadata(model, choices.get(name)),
        )
        for name, model in predictors.items()
    }
    batchers = [entry.batcher for entry in served.values() if entry.batcher is not None]
    in_flight = InFlightTexts(limits.max_queued_texts, metrics.in_flight)
    common = {
        "limits": {"max_texts": limits.max_texts, "max_chars": limits.max_chars,
                   "max_queued_texts": limits.max_queued_texts, "request_timeout_s": limits.request_timeout_s},
        "batching": None if batching is None else asdict(batching),
    }
    if named:
        metadata = {"adapters": {name: entry.metadata for name, entry in served.items()}, **common}
    else:
        metadata = {**served["default"].metadata, **common}

    def choose(payload: dict[str, Any]) -> _Served:
        """The model a request names (or the only one)."""
        name = payload.get(ADAPTER_KEY)
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise RequestError(f'name the model in "{ADAPTER_KEY}": one of {sorted(served)}')
        if not named or name not in served:
            known = sorted(served) if named else "none (this server has one model)"
            raise RequestError(f'unknown "{ADAPTER_KEY}"; served: {known}. Received: {ADAPTER_KEY}={str(name)[:80]!r}', 404)
        return served[name]

    async def unbatched(model: Predictor, inputs: list[TextInput], task: Optional[str]) -> list[AnyPrediction]:
        predictions = await run_in_threadpool(functools.partial(model.predict, inputs, task=task))
        metrics.observe_call(len(inputs), 1)
        return predictions

    def refuse(error: RequestError) -> JSONResponse:
        if error.refused:
            metrics.refused.labels(error.refused).inc()
        return JSONResponse({"error": str(error)}, status_code=error.status)

    def at_capacity() -> JSONResponse:
        metrics.refused.labels("queue_full").inc()
        return JSONResponse(
            {"error": f"the server is at capacity ({in_flight.count} of at most {limits.max_queued_texts} inputs "
                      f"queued or computing); retry in {RETRY_AFTER_S} s"},
            status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    async def predict(request: Request) -> JSONResponse:
        try:
            payload = parse_payload(await read_body(request, limits), limits)
            entry = choose(payload)
            task = parse_task(payload, entry.predictor)
            head = entry.predictor if task is None else entry.predictor.for_task(task)
            inputs = parse_inputs(payload, limits, head.bundle.task)
        except RequestError as error:
            return refuse(error)
        if not in_flight.admit(len(inputs)):
            return at_capacity()
        batcher = entry.batcher
        batch_it = batcher is not None and batcher.batching.batches(inputs)
        # The work is its own task, shielded from the timeout: it ends (and leaves the count) only
        # when its model call does, since a call running in a thread cannot be stopped.
        work = asyncio.ensure_future(
            batcher.predict(inputs, task) if batch_it else unbatched(entry.predictor, inputs, task))
        work.add_done_callback(functools.partial(in_flight.release, len(inputs)))
        try:
            predictions = await asyncio.wait_for(asyncio.shield(work), limits.request_timeout_s)
        except asyncio.TimeoutError:
            metrics.refused.labels("timeout").inc()
            return JSONResponse({"error": f"no prediction within {limits.request_timeout_s:g} s (request_timeout_s): "
                                          "the server is overloaded or stalled"}, status_code=504)
        except (TfsftError, ValueError) as error:
            return JSONResponse({"error": " ".join(str(error).split())}, status_code=500)
        return JSONResponse({"predictions": [p.to_dict() for p in predictions]})

    async def generate(request: Request) -> Response:
        """POST /generate: the continuation of each prompt, or (stream) server-sent events."""
        try:
            payload = parse_payload(await read_body(request, limits), limits)
            entry = choose(payload)
            if not entry.predictor.generates:
                body = '{"task": "...", "texts": ["..."]}' if entry.predictor.heads else '{"texts": ["..."]}'
                raise RequestError(f"this {entry.predictor.bundle.task} model does not generate text: POST /predict {body}")
            parsed = parse_generate(payload, limits)
        except RequestError as error:
            return refuse(error)
        if not in_flight.admit(len(parsed.prompts)):
            return at_capacity()
        if parsed.stream:
            return await stream_generation(entry.predictor, parsed)
        work = asyncio.ensure_future(run_in_threadpool(entry.predictor.generate, parsed.prompts, **parsed.settings))
        work.add_done_callback(functools.partial(in_flight.release, len(parsed.prompts)))
        try:
            generations = await asyncio.wait_for(asyncio.shield(work), limits.request_timeout_s)
        except asyncio.TimeoutError:
            metrics.refused.labels("timeout").inc()
            return JSONResponse({"error": f"no generation within {limits.request_timeout_s:g} s (request_timeout_s): "
                                          "the server is overloaded or stalled"}, status_code=504)
        except (DataError, ConfigError) as error:
            return refuse(_generation_error(error))
        except (TfsftError, ValueError) as error:
            return JSONResponse({"error": " ".join(str(error).split())}, status_code=500)
        metrics.observe_call(len(parsed.prompts), 1)
        return JSONResponse({"generations": [{"text": g.text, "finish_reason": g.finish_reason} for g in generations]})

    async def stream_generation(predictor: Predictor, parsed: GenerateRequest) -> Response:
        """An event stream of one prompt's text as it is generated: `{"text": piece}` events,
        then `{"finish_reason", "text"}` (the whole text) and `[DONE]`. The prompt is checked
        before the stream starts (a 400 then); a failure after that is an `{"error"}` event. The
        request timeout does not apply: a stream sends as it goes."""
        try:
            events = await run_in_threadpool(predictor.stream, parsed.prompts[0], **parsed.settings)
        except (DataError, ConfigError) as error:
            in_flight.release(1)
            return refuse(_generation_error(error))
        except BaseException:
            in_flight.release(1)
            raise
        return StreamingResponse(sse_events(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def sse_events(events: Any) -> AsyncIterator[str]:
        """The stream's events; each step runs in the thread pool, and the count of texts in flight
        drops when the stream ends, however it ends (a client that goes away included)."""
        try:
            async for event in iterate_in_threadpool(events):
                if isinstance(event, Generation):
                    yield _sse({"finish_reason": event.finish_reason, "text": event.text})
                else:
                    yield _sse({"text": event})
            metrics.observe_call(1, 1)
            yield SSE_DONE
        except (TfsftError, ValueError) as error:
            yield _sse({"error": " ".join(str(error).split())})
        finally:
            events.close()
            in_flight.release(1)

    async def health(request: Request) -> JSONResponse:
        if not all(batcher.healthy for batcher in batchers):
            return JSONResponse({"status": "error", "error": "a micro-batching worker has stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def instrumented(endpoint: str, handler: Callable[[Request], Awaitable[Response]]):
        async def handle(request: Request) -> Response:
            begin, status = time.perf_counter(), 500
            try:
                response = await handler(request)
                status = response.status_code
                return response
            finally:
                metrics.requests.labels(endpoint, str(status)).inc()
                if status >= 400:
                    metrics.errors.labels(endpoint, str(status)).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - begin)

        return handle

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for batcher in batchers:
            await batcher.start()
        try:
            yield
        finally:
            for batcher in batchers:
                await batcher.stop()

    app = Starlette(
        routes=[
            Route("/predict", instrumented("/predict", predict), methods=["POST"]),
            Route("/generate", instrumented("/generate", generate), methods=["POST"]),
            Route("/health", instrumented("/health", health), methods=["GET"]),
            Route("/metadata", instrumented("/metadata", meta), methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.batcher = batchers[0] if len(batchers) == 1 else None
    app.state.batchers, app.state.metrics = batchers, metrics
    return app


# -------------------------------------------------------------------------------- the server

SETTINGS_ENV = "TFSFT_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    """Everything a server process needs to build its app; passed to `--workers` processes as JSON."""

    bundle_dir: Optional[str] = None
    precision: str = "auto"
    limits: Limits = Limits()
    batching: Optional[Batching] = Batching()
    num_threads: Optional[int] = None
    adapters: tuple[tuple[str, str], ...] = ()
    """(name, bundle dir) of each model served by name (`--adapter NAME=RUN`), instead of `bundle_dir`."""
    share_base: bool = True
    """Serve adapters whose bundles ship one base graph (`--adapter_files`) from one session of it."""

    def __post_init__(self) -> None:
        if (self.bundle_dir is None) == (not self.adapters):
            raise ConfigError(
                "serve one bundle, or several named ones with --adapter NAME=RUN_DIR, not both. "
                f"Received: bundle={self.bundle_dir!r}, adapters={[name for name, _ in self.adapters]}"
            )
        names = [name for name, _ in self.adapters]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"--adapter: each name once. Received: {duplicate!r} twice")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        values = json.loads(text)
        batching = values.pop("batching")
        adapters = tuple((name, path) for name, path in values.pop("adapters", ()))
        return cls(
            limits=Limits(**values.pop("limits")), batching=Batching(**batching) if batching else None,
            adapters=adapters, **values,
        )

    def bundles(self) -> dict[str, str]:
        """The bundle directory of each served model: {"default": bundle_dir}, or the adapters by name."""
        return dict(self.adapters) if self.adapters else {"default": str(self.bundle_dir)}

    def choices(self) -> dict[str, PrecisionChoice]:
        from tfsft.inference import Bundle

        return {name: choose_precision(Bundle.load(path), self.precision) for name, path in self.bundles().items()}

    def sharing(self, choices: dict[str, PrecisionChoice]) -> tuple[bool, str]:
        """(whether the adapters run on one shared base session, why or why not)."""
        from tfsft.inference import Bundle, shared_base_problem

        if len(self.adapters) < 2:
            return False, "one model"
        if not self.share_base:
            return False, "--no_share_base"
        bundles = {name: Bundle.load(path) for name, path in self.adapters}
        problem = shared_base_problem(bundles, {name: bool(choices[name].int8) for name in bundles})
        return problem is None, problem or "one base graph, each adapter's own weights per call"

    def build_app(self, choices: Optional[dict[str, PrecisionChoice]] = None) -> Starlette:
        """The app; `choices`: the precision already chosen for each bundle (else chosen here)."""
        from tfsft.inference import shared_base_predictors

        choices = choices or self.choices()
        if self.sharing(choices)[0]:
            int8 = bool(next(iter(choices.values())).int8)
            predictors = shared_base_predictors(dict(self.adapters), int8=int8, num_threads=self.num_threads)
        else:
            predictors = {
                name: Predictor(path, int8=choices[name].int8, num_threads=self.num_threads)
                for name, path in self.bundles().items()
            }
        if not self.adapters:
            return create_app(predictors["default"], self.limits, self.batching, precision=choices["default"])
        return create_app(predictors, self.limits, self.batching, precision=choices)


def bundle_directory(path: str) -> str:
    """A bundle directory from a path to one or to the run that holds it (RUN_DIR/onnx); else `path`
    as given, for `Bundle.load` to refuse with its own message."""
    from tfsft import artifacts

    return str(artifacts.find_bundle(path) or path)


def app_from_environment() -> Starlette:
    """The app of one `--workers` process (uvicorn's factory), from the settings `serve` left in the environment."""
    return ServeSettings.from_json(os.environ[SETTINGS_ENV]).build_app()


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080, workers: int = 1, access_log: bool = False) -> None:
    """Load the bundle and serve it with uvicorn until interrupted (access log off: it costs CPU per request).

    `workers > 1` starts that many server processes on one port (uvicorn's workers), each with its
    own Predictor; each then gets cores / workers onnxruntime threads unless `num_threads` is set,
    and /metrics sums all of them.
    """
    import uvicorn

    from tfsft.inference import Bundle

    if not 1 <= workers <= 64:
        raise ConfigError(f"--workers must be in [1, 64]. Received: workers={workers}")
    choices = settings.choices()
    batching = settings.batching
    mode = "one call per request" if batching is None else (
        f"micro-batching (<= {batching.max_texts} texts, {batching.max_wait_ms:g} ms wait, {batching.concurrency} in "
        f"flight) of requests whose texts have at most {batching.max_input_chars or 'any number of'} characters")
    limits = settings.limits
    timeout = "no timeout" if limits.request_timeout_s is None else f"{limits.request_timeout_s:g} s timeout"
    served = []
    bundles = {name: Bundle.load(path) for name, path in settings.bundles().items()}
    if all(not bundle.heads and TASKS[bundle.task].generates for bundle in bundles.values()):
        mode = "text generation on POST /generate, one model call per request (not micro-batched)"
    for name, bundle in bundles.items():
        choice = choices[name]
        tasks = ", ".join(f"{task} ({head.task})" for task, head in bundle.heads.items())
        served.append(
            f"{'' if not settings.adapters else f'adapter {name!r}: '}{bundle.directory}: {choice.name} model "
            f"{bundle.model_path(int8=choice.int8).name} ({choice.reason})"
            + (f"; tasks (name \"task\" in each /predict body): {tasks}" if tasks else "")
        )
    if settings.adapters:
        shared, why = settings.sharing(choices)
        served.append(f"adapters {'share one base session' if shared else 'served as separate models'} ({why})")
    print(f"[tfsft] serving on http://{host}:{port}: {'; '.join(served)}; {mode}; at most {limits.max_queued_texts} "
          f"inputs queued per process, {timeout} per request; {workers} worker process(es)",
          file=sys.stderr, flush=True)
    if workers == 1:
        uvicorn.run(settings.build_app(choices), host=host, port=port, log_level="info", access_log=access_log)
        return
    if settings.num_threads is None:
        settings = dataclasses.replace(settings, num_threads=max(1, (os.cpu_count() or 1) // workers))
    with tempfile.TemporaryDirectory(prefix="tfsft-metrics-") as metrics_dir:
        os.environ[MULTIPROCESS_ENV] = metrics_dir
        os.environ[SETTINGS_ENV] = settings.to_json()
        uvicorn.run("tfsft.serving:app_from_environment", factory=True, host=host, port=port, workers=workers,
                    log_level="info", access_log=access_log)
