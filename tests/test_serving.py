"""The HTTP server, started for real on a free loopback port and called over HTTP: in a thread,
and as `scripts/serve.py` in its own process under a load of mixed requests; micro-batching."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, tiny_bundle
from tfsft import artifacts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_checkpoint, sst2_slices):
    return tiny_bundle(tmp_path_factory.mktemp("serving"), tiny_checkpoint, sst2_slices["dev"])


@pytest.fixture(scope="module")
def server(bundle_dir):
    """(base URL, Predictor) of a uvicorn server in a thread, stopped after the module."""
    import uvicorn

    from tfsft.inference import Predictor
    from tfsft.serving import Limits, create_app

    predictor = Predictor(bundle_dir)
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


# ------------------------------------------------------------------------------ micro-batching


class FakePredictor:
    """Records each call; labels each input by its own text, so misrouted results show."""

    def __init__(self, fail_on: str = ""):
        self.calls: list[list] = []
        self.fail_on = fail_on

    def predict(self, inputs, task=None):
        from tfsft.inference import Prediction

        self.calls.append(list(inputs))
        if any(self.fail_on and self.fail_on in str(item) for item in inputs):
            raise ValueError("cannot predict this one")
        return [Prediction(label=str(item), probabilities={}) for item in inputs]


def batched(predictor, requests, max_texts=64, max_wait_ms=100.0):
    """Send `requests` (lists of inputs) concurrently through a MicroBatcher; (result or error) per request."""
    from tfsft.serving import Batching, MicroBatcher

    async def main():
        batcher = MicroBatcher(predictor, Batching(max_texts=max_texts, max_wait_ms=max_wait_ms))
        await batcher.start()
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(batcher.predict(r) for r in requests), return_exceptions=True), timeout=10)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_micro_batcher_merges_concurrent_requests_and_keeps_order():
    predictor = FakePredictor()
    requests = [[f"r{i}a", f"r{i}b"][: 1 + i % 2] for i in range(10)]
    results = batched(predictor, requests)
    assert [[p.label for p in result] for result in results] == requests
    assert len(predictor.calls) == 1 and predictor.calls[0] == [t for r in requests for t in r]


def test_micro_batcher_caps_batches_and_separates_pairs():
    predictor = FakePredictor()
    requests = [["a"], ["b"], [("c", "d")], ["e"], ["f"], ["g"]]
    results = batched(predictor, requests, max_texts=3)
    assert [[p.label for p in result] for result in results] == [[str(x) for x in r] for r in requests]
    assert all(len(call) <= 3 for call in predictor.calls)
    assert all(len({type(item) for item in call}) == 1 for call in predictor.calls)
    assert sum(len(call) for call in predictor.calls) == 6


def test_micro_batcher_fails_only_the_bad_request():
    predictor = FakePredictor(fail_on="bad")
    results = batched(predictor, [["good 1"], ["bad"], ["good 2"]])
    assert [p.label for p in results[0]] == ["good 1"] and [p.label for p in results[2]] == ["good 2"]
    assert isinstance(results[1], ValueError)


# -------------------------------------------------------------------- scripts/serve.py process

START_TIMEOUT_S = 90


def start_server(args, timeout=START_TIMEOUT_S, command=None, env=None, cwd=ROOT):
    """Start `command` (default: scripts/serve.py) with `args` on a free loopback port and wait
    for /health; returns (base URL, process)."""
    port = free_port()
    command = command or [sys.executable, str(ROOT / "scripts" / "serve.py")]
    process = subprocess.Popen(
        [*command, *args, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, process, timeout)
    return base, process


def wait_healthy(base: str, process, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited early: {process.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"the server did not answer /health within {timeout} s"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)
    stderr = process.stderr.read()
    process.stderr.close()
    return stderr


@pytest.fixture(scope="module")
def served(bundle_dir):
    """Base URL of `scripts/serve.py` running in its own process on a free loopback port; always stopped."""
    base, process = start_server([str(bundle_dir), "--max_texts", "4", "--max_chars", "200", "--max_wait_ms", "5",
                                  "--precision", "fp32", "--request_timeout_s", "20", "--max_queued_texts", "100"])
    try:
        yield base, process
    finally:
        stop_server(process)


def test_serve_script_answers_over_http(served, server):
    import httpx

    base, _ = served
    _, predictor = server
    texts = ["a wonderful, moving film", "dull and far too long"]
    response = httpx.post(f"{base}/predict", json={"texts": texts}, timeout=20)
    assert response.status_code == 200
    expected = predictor.predict(texts)
    got = response.json()["predictions"]
    assert [g["label"] for g in got] == [e.label for e in expected]
    assert got[1]["probabilities"] == pytest.approx(expected[1].probabilities, abs=1e-5)
    meta = httpx.get(f"{base}/metadata", timeout=10).json()
    assert meta["limits"] == {"max_texts": 4, "max_chars": 200, "max_queued_texts": 100, "request_timeout_s": 20.0}
    assert meta["batching"] == {"max_texts": 64, "max_wait_ms": 5, "concurrency": 2, "max_input_chars": 40}  # on by default
    assert meta["precision"] == {"precision": "fp32", "requested": "fp32", "reason": "fp32 requested"}


def mixed_requests(texts: list[str], count: int, seed: int = 0) -> list[tuple[bytes, object]]:
    """(body, expected) pairs: expected is a list of inputs for a valid request, else a 4xx status."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        kind = i % 10
        if kind < 5:
            inputs = rng.sample(texts, rng.randint(1, 4))
            requests.append((json.dumps({"texts": inputs}).encode(), inputs))
        elif kind == 5:
            pairs = [rng.sample(texts, 2) for _ in range(rng.randint(1, 3))]
            requests.append((json.dumps({"pairs": pairs}).encode(), [tuple(p) for p in pairs]))
        elif kind == 6:
            requests.append((rng.choice([b"{not json", b"[]", b"{}", b'{"texts": []}', b'{"texts": [7]}', b"\xff\xfe"]), 400))
        elif kind == 7:
            requests.append((json.dumps({"texts": rng.sample(texts, 5)}).encode(), 413))
        elif kind == 8:
            requests.append((json.dumps({"texts": ["x" * 201]}).encode(), 413))
        else:
            requests.append((json.dumps({"pairs": [["only one"]]}).encode(), 400))
    return requests


def test_mixed_load_from_16_threads(served, server, sst2_slices):
    """500 requests (valid, malformed, oversized) from 16 threads: no 5xx, valid ones answered
    exactly as the Predictor answers them directly, and the server still healthy afterwards."""
    from tfsft.data import read_examples
    from tfsft.config import DataConfig

    base, process = served
    _, predictor = server
    texts = [t for t in read_examples(str(sst2_slices["dev"]), DataConfig()).texts if len(t) <= 200]
    requests = mixed_requests(texts, 500)
    host, port = base.removeprefix("http://").split(":")
    local = threading.local()
    deadline = time.monotonic() + 120

    def send(request):
        body, _ = request
        assert time.monotonic() < deadline, "the load test ran out of time"
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        local.conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
        response = local.conn.getresponse()
        return response.status, json.loads(response.read())

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, requests))

    server_errors = [(status, body) for status, body in answers if status >= 500]
    assert not server_errors, server_errors[:3]
    valid = [(inputs, body) for (_, inputs), (status, body) in zip(requests, answers) if isinstance(inputs, list)]
    assert all("predictions" in body for _, body in valid)
    flat_inputs = [item for inputs, _ in valid for item in inputs]
    expected = {}
    for kind in (str, tuple):
        items = [item for item in flat_inputs if isinstance(item, kind)]
        expected.update(zip(items, predictor.predict(items)))
    for inputs, body in valid:
        assert len(body["predictions"]) == len(inputs)
        for item, got in zip(inputs, body["predictions"]):
            assert got["label"] == expected[item].label
            assert got["probabilities"] == pytest.approx(expected[item].probabilities, abs=1e-5)
    for (_, want), (status, body) in zip(requests, answers):
        if isinstance(want, int):
            assert status == want and body["error"], (status, body)
    import httpx

    assert process.poll() is None
    assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok"}


# ------------------------------------------------------------------- metrics, limits, health


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_errors_latency_and_batch_sizes(bundle_dir):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, create_app

    app = create_app(Predictor(bundle_dir), batching=Batching(max_wait_ms=0))
    with TestClient(app) as client:
        for texts in (["a fine film"], ["dull", "bright and warm", "long"], ["ok"]):
            assert client.post("/predict", json={"texts": texts}).status_code == 200
        assert client.post("/predict", content=b"{not json").status_code == 400
        assert client.post("/predict", json={"texts": ["x" * 20_000]}).status_code == 413
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = scrape(response.text)
    assert samples[("tfsft_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 3
    assert samples[("tfsft_requests_total", (("endpoint", "/predict"), ("status", "400")))] == 1
    assert samples[("tfsft_errors_total", (("endpoint", "/predict"), ("status", "413")))] == 1
    assert samples[("tfsft_request_duration_seconds_count", (("endpoint", "/predict"),))] == 5
    assert samples[("tfsft_texts_total", ())] == 5
    assert samples[("tfsft_batch_texts_count", ())] == 3 and samples[("tfsft_batch_texts_sum", ())] == 5
    assert samples[("tfsft_batch_texts_bucket", (("le", "1.0"),))] == 2  # two one-text requests, served one by one
    assert samples[("tfsft_batch_texts_bucket", (("le", "4.0"),))] == 3
    assert samples[("tfsft_queue_depth", ())] == 0
    assert samples[("tfsft_texts_per_second", ())] == pytest.approx(0.5)


def test_concurrent_requests_form_batches_that_metrics_show(bundle_dir):
    """16 requests at once, one batch worker busy on a slow first call: the rest queue up and
    are answered in (far) fewer model calls, as the batch-size histogram shows."""
    import threading as th

    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, create_app

    predictor = Predictor(bundle_dir)
    first_call = th.Event()
    release = th.Event()
    predict = predictor.predict

    def slow_first_predict(inputs, task=None):
        if not first_call.is_set():
            first_call.set()
            release.wait(10)
        return predict(inputs, task=task)

    predictor.predict = slow_first_predict
    app = create_app(predictor, batching=Batching(concurrency=1))
    with TestClient(app) as client, ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client.post, "/predict", json={"texts": [f"text number {i}"]}) for i in range(16)]
        assert first_call.wait(10)
        deadline = time.monotonic() + 10
        while scrape(client.get("/metrics").text)[("tfsft_queue_depth", ())] < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        assert all(f.result().status_code == 200 for f in futures)
        samples = scrape(client.get("/metrics").text)
    assert samples[("tfsft_batch_texts_count", ())] == 2  # the slow one, then the 15 that queued behind it
    assert samples[("tfsft_batch_requests_bucket", (("le", "16.0"),))] - samples[("tfsft_batch_requests_bucket", (("le", "8.0"),))] == 1


def test_oversized_bodies_are_refused_without_reading_them(server):
    """413 from Content-Length before the body is read, and while streaming a chunked body."""
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.putrequest("POST", "/predict")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(10_000_000))
    conn.endheaders()
    conn.send(b'{"texts": ["')  # the other 10 MB are never sent: the answer must not wait for them
    response = conn.getresponse()
    assert response.status == 413 and "exceeds" in json.loads(response.read())["error"]
    conn.close()

    def ten_megabytes():
        yield b'{"texts": ["'
        for _ in range(100):
            yield b"x" * 100_000
        yield b'"]}'

    response = post(f"{base}/predict", content=ten_megabytes())
    assert response.status_code == 413


def test_a_chunked_body_is_capped_while_it_streams_in(server):
    """A chunked body over the limit gets its 413 as soon as the limit is passed: the server must
    not wait for (or buffer) the rest, which here never comes."""
    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/predict")
    conn.putheader("content-type", "application/json")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    piece = b"x" * 100_000
    for _ in range(41):  # 4.1 MB, just past the 4 MB limit, and no terminating chunk
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    response = conn.getresponse()
    assert response.status == 413 and "exceeds 4000000 bytes" in json.loads(response.read())["error"]
    conn.close()


def test_health_fails_when_a_batch_worker_has_died(bundle_dir):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, create_app

    app = create_app(Predictor(bundle_dir), batching=Batching())
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
        app.state.batcher._workers[0].cancel()
        time.sleep(0.1)
        response = client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "error"


def slow_on(predictor, marker: str, seconds: float):
    """Make `predictor` sleep `seconds` on any call whose inputs contain `marker`."""
    predict = predictor.predict

    def maybe_slow(inputs, task=None):
        if any(marker in str(item) for item in inputs):
            time.sleep(seconds)
        return predict(inputs, task=task)

    predictor.predict = maybe_slow
    return predictor


def wait_for_sample(client, name: str, value: float, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(client.get("/metrics").text)
        if samples[(name, ())] == value or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


@pytest.mark.parametrize("micro_batching", [True, False])
def test_a_slow_prediction_gets_504_and_the_server_stays_healthy(bundle_dir, micro_batching):
    """Past --request_timeout_s the request gets a 504 at once; the next one is answered as usual.
    The model call that timed out cannot be interrupted: its inputs count as in flight until it ends."""
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, Limits, create_app

    predictor = slow_on(Predictor(bundle_dir), "slow", 3.0)
    app = create_app(predictor, Limits(request_timeout_s=0.5), batching=Batching() if micro_batching else None)
    with TestClient(app) as client:
        begin = time.monotonic()
        response = client.post("/predict", json={"texts": ["a slow one", "and another"]})
        assert response.status_code == 504 and "0.5 s" in response.json()["error"]
        assert time.monotonic() - begin < 2.5
        assert client.post("/predict", json={"texts": ["a quick one"]}).status_code == 200
        assert client.get("/health").json() == {"status": "ok"}
        assert scrape(client.get("/metrics").text)[("tfsft_texts_in_flight", ())] == 2
        samples = wait_for_sample(client, "tfsft_texts_in_flight", 0)
    assert samples[("tfsft_texts_in_flight", ())] == 0
    assert samples[("tfsft_refused_total", (("reason", "timeout"),))] == 1
    assert samples[("tfsft_errors_total", (("endpoint", "/predict"), ("status", "504")))] == 1


@pytest.mark.parametrize("micro_batching", [True, False])
def test_a_full_queue_gets_503_with_retry_after(bundle_dir, micro_batching):
    """With 3 of --max_queued_texts 4 inputs in flight, a request of 2 more is refused at once;
    one of 1 more is still taken; all are answered once the model is free again."""
    import threading as th

    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, Limits, create_app

    predictor = Predictor(bundle_dir)
    release = th.Event()
    predict = predictor.predict

    def blocked(inputs, task=None):
        release.wait(20)
        return predict(inputs, task=task)

    predictor.predict = blocked
    app = create_app(predictor, Limits(max_texts=4, max_queued_texts=4), batching=Batching() if micro_batching else None)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(client.post, "/predict", json={"texts": ["one", "two", "three"]})
            assert wait_for_sample(client, "tfsft_texts_in_flight", 3)[("tfsft_texts_in_flight", ())] == 3
            refused = client.post("/predict", json={"texts": ["four", "five"]})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "4 inputs" in refused.json()["error"]
            last = pool.submit(client.post, "/predict", json={"texts": ["four"]})
            assert wait_for_sample(client, "tfsft_texts_in_flight", 4)[("tfsft_texts_in_flight", ())] == 4
        finally:
            release.set()
        assert first.result().status_code == 200 and last.result().status_code == 200
        assert client.post("/predict", json={"texts": ["four", "five"]}).status_code == 200
        samples = scrape(client.get("/metrics").text)
    assert samples[("tfsft_texts_in_flight", ())] == 0
    assert samples[("tfsft_refused_total", (("reason", "queue_full"),))] == 1
    assert samples[("tfsft_errors_total", (("endpoint", "/predict"), ("status", "503")))] == 1


def test_oversized_bodies_are_counted_in_metrics(bundle_dir):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Limits, create_app

    app = create_app(Predictor(bundle_dir), Limits(max_body_bytes=1000))
    with TestClient(app) as client:
        assert client.post("/predict", content=b"x" * 2000).status_code == 413
        assert client.post("/predict", content=iter([b"x" * 600, b"x" * 600])).status_code == 413
        samples = scrape(client.get("/metrics").text)
    assert samples[("tfsft_refused_total", (("reason", "body_too_large"),))] == 2


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(max_queued_texts=0), "max_queued_texts=0"),
        (dict(max_texts=8, max_queued_texts=4), "at least --max_texts"),
        (dict(request_timeout_s=0.0), "request_timeout_s=0.0"),
        (dict(request_timeout_s=float("inf")), "request_timeout_s=inf"),
    ],
)
def test_bad_limits_are_config_errors(values, message):
    from tfsft.errors import ConfigError
    from tfsft.serving import Limits

    with pytest.raises(ConfigError, match=message):
        Limits(**values)


# ---------------------------------------------------------------------------------- precision


def bundle_with_int8_drop(bundle_dir, tmp_path, drop):
    import shutil

    copy = tmp_path / f"bundle-{drop}"
    shutil.copytree(bundle_dir, copy)
    report = json.loads((copy / artifacts.BUNDLE_REPORT).read_text())
    report["keras_accuracy"] = 0.9
    report["int8"] = {"accuracy": 0.9 - drop, "accuracy_drop": drop, "label_agreement": 0.99, "size_ratio": 3.9}
    (copy / artifacts.BUNDLE_REPORT).write_text(json.dumps(report))
    return copy


@pytest.mark.parametrize("drop, int8", [(0.004, True), (0.01, True), (0.02, False)])
def test_auto_precision_takes_int8_only_within_one_point(bundle_dir, tmp_path, drop, int8):
    from tfsft.inference import Bundle, choose_precision

    bundle = Bundle.load(bundle_with_int8_drop(bundle_dir, tmp_path, drop))
    choice = choose_precision(bundle, "auto")
    assert choice.int8 is int8
    assert f"drop {drop:.4f}" in choice.reason
    assert choose_precision(bundle, "fp32").int8 is False and choose_precision(bundle, "int8").int8 is True


def test_auto_precision_without_an_int8_model_or_report_is_fp32(bundle_dir, tmp_path):
    import shutil

    from tfsft.errors import ArtifactError, ConfigError
    from tfsft.inference import Bundle, choose_precision

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "no-int8"))
    meta = json.loads((copy / artifacts.BUNDLE_FILE).read_text())
    del meta["files"]["int8"]
    (copy / artifacts.BUNDLE_FILE).write_text(json.dumps(meta))
    assert choose_precision(Bundle.load(copy), "auto").reason == "the bundle has no int8 model"
    with pytest.raises(ArtifactError, match="no int8 model"):
        choose_precision(Bundle.load(copy), "int8")
    with pytest.raises(ConfigError, match="precision"):
        choose_precision(Bundle.load(copy), "fp16")


def test_two_worker_processes_serve_one_port_with_summed_metrics(bundle_dir, tmp_path):
    import httpx

    bundle = bundle_with_int8_drop(bundle_dir, tmp_path, 0.003)
    base, process = start_server([str(bundle), "--workers", "2"])
    try:
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 2, children
        meta = httpx.get(f"{base}/metadata", timeout=10).json()
        assert meta["precision"]["precision"] == "int8" and meta["model_file"] == "model.int8.onnx"
        for i in range(20):
            with httpx.Client(timeout=20) as client:  # a new connection each time: any worker may take it
                assert client.post(f"{base}/predict", json={"texts": [f"text {i}"]}).status_code == 200
        samples = scrape(httpx.get(f"{base}/metrics", timeout=10).text)
        assert samples[("tfsft_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 20
        assert samples[("tfsft_texts_total", ())] == 20
    finally:
        stderr = stop_server(process)
    assert "int8 model model.int8.onnx (validation accuracy: int8 0.8970, Keras 0.9000 (drop 0.0030), within 0.01)" in stderr
    assert "2 worker process(es)" in stderr


def test_only_requests_of_short_texts_are_micro_batched(bundle_dir):
    """Batching pays on short texts only; longer ones get their own call (and pairs count both texts)."""
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, create_app

    assert Batching(max_input_chars=None).batches(["x" * 10_000])
    app = create_app(Predictor(bundle_dir), batching=Batching(max_input_chars=12))
    batched = []
    with TestClient(app) as client:
        batch_predict = app.state.batcher.predict

        async def recording_predict(inputs, task=None):
            batched.append(inputs)
            return await batch_predict(inputs, task)

        app.state.batcher.predict = recording_predict
        for body in ({"texts": ["short one"]}, {"texts": ["short", "a text of more than twelve characters"]},
                     {"pairs": [["ab", "cd"]]}, {"pairs": [["abcdefgh", "ijklmnop"]]}):
            assert client.post("/predict", json=body).status_code == 200
        samples = scrape(client.get("/metrics").text)
    assert batched == [["short one"], [("ab", "cd")]]
    assert samples[("tfsft_batch_texts_count", ())] == 4 and samples[("tfsft_texts_total", ())] == 5


def test_several_named_models_serve_from_one_app_and_route_by_adapter(bundle_dir, tmp_path):
    """`--adapter NAME=RUN`: each request names its model; a name that is not served is a 404."""
    import shutil

    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, ServeSettings, create_app

    other = Path(shutil.copytree(bundle_dir, tmp_path / "other" / artifacts.ONNX_DIR))
    meta = json.loads((other / artifacts.BUNDLE_FILE).read_text())
    meta["labels"] = [f"other-{label}" for label in meta["labels"]]
    (other / artifacts.BUNDLE_FILE).write_text(json.dumps(meta))
    predictors = {"first": Predictor(bundle_dir), "second": Predictor(other)}
    texts = ["a fine film", "dull and long"]
    expected = {name: [p.to_dict() for p in predictor.predict(texts)] for name, predictor in predictors.items()}
    assert expected["first"] != expected["second"]
    for batching in (Batching(), None):
        with TestClient(create_app(predictors, batching=batching)) as client:
            for name in predictors:
                answer = client.post("/predict", json={"adapter": name, "texts": texts})
                assert answer.status_code == 200 and answer.json()["predictions"] == expected[name]
            missing = client.post("/predict", json={"texts": texts})
            assert missing.status_code == 400 and "one of ['first', 'second']" in missing.json()["error"]
            unknown = client.post("/predict", json={"adapter": "third", "texts": texts})
            assert unknown.status_code == 404 and "third" in unknown.json()["error"]
            meta = client.get("/metadata").json()
            assert sorted(meta["adapters"]) == ["first", "second"]
            assert meta["adapters"]["second"]["labels"] == [f"other-{label}" for label in predictors["first"].labels]
            assert client.get("/health").json() == {"status": "ok"}

    settings = ServeSettings(adapters=(("first", str(bundle_dir)), ("second", str(other))), precision="fp32")
    assert ServeSettings.from_json(settings.to_json()) == settings
    with TestClient(settings.build_app()) as client:
        assert client.post("/predict", json={"adapter": "second", "texts": texts}).json()["predictions"] == expected["second"]
    with TestClient(create_app(predictors["first"])) as client:  # one unnamed model: "adapter" is refused
        assert client.post("/predict", json={"adapter": "first", "texts": texts}).status_code == 404


def test_adapter_flags_are_checked(bundle_dir):
    from tfsft.commands.serve import build_parser
    from tfsft.errors import ConfigError
    from tfsft.serving import ServeSettings

    run_dir = bundle_dir.parent
    args = build_parser().parse_args(["--adapter", f"a={run_dir}", "--adapter", f"b={bundle_dir}"])
    assert args.bundle is None and args.adapter == [("a", str(bundle_dir)), ("b", str(bundle_dir))]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--adapter", "no-equals-sign"])
    with pytest.raises(ConfigError, match="not both"):
        ServeSettings(bundle_dir=str(bundle_dir), adapters=(("a", str(bundle_dir)),))
    with pytest.raises(ConfigError, match="not both"):
        ServeSettings()
    with pytest.raises(ConfigError, match="'a' twice"):
        ServeSettings(adapters=(("a", str(bundle_dir)), ("a", str(bundle_dir))))


def test_generate_on_a_classifier_is_a_400_that_points_to_predict(bundle_dir):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import create_app

    with TestClient(create_app(Predictor(bundle_dir))) as client:
        response = client.post("/generate", json={"prompts": ["a fine film"]})
        meta = client.get("/metadata").json()
    assert response.status_code == 400 and "does not generate text: POST /predict" in response.json()["error"]
    assert "generation" not in meta and meta["task"] == "classification"
