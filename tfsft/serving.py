"""HTTP API around a Predictor: a Starlette app, served by uvicorn. No TensorFlow here.

Every client mistake (bad JSON, missing or mistyped fields, empty or oversized requests) gets
a 4xx with a one-line message; inference runs in Starlette's threadpool so the event loop
keeps answering (health checks included) while a batch is computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tfsft.inference import Predictor


@dataclass(frozen=True)
class Limits:
    """Request limits: they bound the memory and time one request may take."""

    max_texts: int = 256
    max_chars: int = 10_000
    max_body_bytes: int = 4_000_000


class RequestError(Exception):
    """A client mistake, answered with `status` and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, limits: Limits) -> list[Any]:
    """The inputs of a /predict body: a list of texts or of [text, pair] lists.

    Raises:
        RequestError: naming the offending field or item.
    """
    if len(body) > limits.max_body_bytes:
        raise RequestError(f"request body exceeds {limits.max_body_bytes} bytes", 413)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"body is not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict):
        raise RequestError('body must be a JSON object like {"texts": ["..."]} or {"pairs": [["...", "..."]]}')
    keys = [key for key in ("texts", "pairs") if key in payload]
    if len(keys) != 1:
        raise RequestError('body must have exactly one of the fields "texts" or "pairs"')
    key = keys[0]
    items = payload[key]
    if not isinstance(items, list):
        raise RequestError(f'"{key}" must be a list. Received: {type(items).__name__}')
    if not items:
        raise RequestError(f'"{key}" is empty; send at least one input')
    if len(items) > limits.max_texts:
        raise RequestError(f'"{key}" holds {len(items)} inputs; at most {limits.max_texts} per request', 413)
    for index, item in enumerate(items):
        _check_item(key, index, item, limits)
    return [tuple(item) for item in items] if key == "pairs" else items


def _check_item(key: str, index: int, item: Any, limits: Limits) -> None:
    texts = [item] if key == "texts" else item
    if key == "pairs" and not (isinstance(item, list) and len(item) == 2):
        raise RequestError(f'"pairs"[{index}] must be a list of two strings')
    for text in texts:
        if not isinstance(text, str):
            raise RequestError(f'"{key}"[{index}] must be a string. Received: {type(text).__name__}')
        if not text.strip():
            raise RequestError(f'"{key}"[{index}] is empty')
        if len(text) > limits.max_chars:
            raise RequestError(f'"{key}"[{index}] has {len(text)} characters; at most {limits.max_chars}', 413)


def create_app(predictor: Predictor, limits: Optional[Limits] = None) -> Starlette:
    """The ASGI app: POST /predict, GET /health, GET /metadata."""
    limits = limits or Limits()
    bundle = predictor.bundle
    metadata = {
        "labels": list(predictor.labels),
        "model": bundle.metadata.get("model_name"),
        "model_file": predictor.model_path.name,
        "max_seq_length": bundle.max_seq_length,
        "limits": {"max_texts": limits.max_texts, "max_chars": limits.max_chars},
        "export_report": bundle.report(),
    }

    async def predict(request: Request) -> JSONResponse:
        try:
            inputs = parse_request(await request.body(), limits)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        predictions = await run_in_threadpool(predictor.predict, inputs)
        return JSONResponse({"predictions": [p.to_dict() for p in predictions]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def meta(request: Request) -> JSONResponse:
        return JSONResponse(metadata)

    return Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metadata", meta, methods=["GET"]),
        ]
    )


def serve(
    bundle_dir: str, host: str = "127.0.0.1", port: int = 8080, int8: bool = False, limits: Optional[Limits] = None,
    num_threads: Optional[int] = None,
) -> None:
    """Load the bundle and serve it with uvicorn until interrupted."""
    import uvicorn

    app = create_app(Predictor(bundle_dir, int8=int8, num_threads=num_threads), limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
