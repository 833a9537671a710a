"""The HTTP server, started for real on a free loopback port and called over HTTP."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tfsft import artifacts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, sst2_slices):
    """(base URL, Predictor) of a uvicorn server in a thread, stopped after the module."""
    import uvicorn

    from tfsft.export import export_bundle
    from tfsft.inference import Predictor
    from tfsft.serving import Limits, create_app

    model, run_dir, examples, labels = make_run(tmp_path_factory.mktemp("serving"), tiny_checkpoint, sst2_slices["dev"])
    export_bundle(model, run_dir, validation_data=(examples.subset(range(24)), labels[:24]))
    predictor = Predictor(run_dir / artifacts.ONNX_DIR)
    app = create_app(predictor, Limits(max_texts=4, max_chars=200))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", predictor
    uv.should_exit = True
    thread.join(timeout=10)


def post(url: str, **kwargs):
    import httpx

    return httpx.post(url, timeout=20, **kwargs)


def test_health_and_metadata(server):
    import httpx

    base, predictor = server
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
    meta = httpx.get(f"{base}/metadata", timeout=10).json()
    assert meta["labels"] == list(predictor.labels)
    assert meta["model"] == predictor.bundle.metadata["model_name"]
    assert "parity" in meta["export_report"]


def test_predict_texts_in_request_order(server):
    base, predictor = server
    texts = ["a wonderful, moving film", "dull", "it was fine i guess, nothing special at all", "bad"]
    response = post(f"{base}/predict", json={"texts": texts})
    assert response.status_code == 200
    got = response.json()["predictions"]
    expected = predictor.predict(texts)
    assert [g["label"] for g in got] == [e.label for e in expected]
    for g, e in zip(got, expected):
        assert g["probabilities"] == pytest.approx(e.probabilities, abs=1e-6)


def test_predict_pairs(server):
    base, predictor = server
    pairs = [["the cat sat", "a cat was sitting"], ["yes", "no"]]
    response = post(f"{base}/predict", json={"pairs": pairs})
    assert response.status_code == 200
    assert [p["label"] for p in response.json()["predictions"]] == [p.label for p in predictor.predict([tuple(x) for x in pairs])]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 400, "exactly one"),
        (b'{"texts": "one text"}', 400, "must be a list"),
        (b'{"texts": []}', 400, "empty"),
        (b'{"texts": [1]}', 400, "must be a string"),
        (b'{"texts": ["  "]}', 400, "is empty"),
        (b'{"pairs": [["only one"]]}', 400, "two strings"),
        (b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "at most 4"),
        (b'{"texts": ["' + b"x" * 201 + b'"]}', 413, "at most 200"),
    ],
)
def test_bad_requests_get_4xx(server, body, status, message):
    base, _ = server
    response = post(f"{base}/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["error"]


def test_wrong_method_and_path(server):
    import httpx

    base, _ = server
    assert httpx.get(f"{base}/predict", timeout=10).status_code == 405
    assert httpx.get(f"{base}/nope", timeout=10).status_code == 404
