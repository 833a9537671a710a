"""Generation with a causal_lm bundle without TensorFlow: `Predictor.generate` and `.stream`,
`tfsft predict` on prompts, and the server's POST /generate (JSON and server-sent events), on a
tiny random Mistral exported with its key/value cache and a word-level tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_generation import PROMPTS, tiny_model

from conftest import ROOT, env_without_training_packages, run_script
from tfsft.errors import ConfigError, DataError
from tfsft.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, DecoderSession, generate

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = [f"w{i}" for i in range(64 - len(SPECIALS))]
TEXTS = ["w40 w41 w42 w43 w44 w45 w46", "w55 w54", "w9", "w33 w26", "w13 w0 w33", "w35 w4 w22 w38 w54"]
"""Prompts whose greedy continuations end on eos (one at once: an empty text) or run to the
length, some through special tokens, which the text skips."""
LONG = " ".join(WORDS[:70] + WORDS[:12])  # 70 words: more than 128 - 64 positions leave
NEW = 10


def word_tokenizer():
    """A word-level `tokenizers.Tokenizer` covering the model's 64 ids: specials 0-5, then WORDS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def write_bundle(directory: Path, chat_template) -> Path:
    """The files a causal_lm run exports to RUN/onnx (the decoders are written by the caller)."""
    meta = {
        "format_version": 2, "task": "causal_lm", "model_name": "tiny-mistral", "model_type": "mistral",
        "labels": [], "id2label": {}, "max_seq_length": 128,
        "inputs": ["input_ids", "attention_mask", "position_ids"], "input_dtype": "int64", "output": "logits",
        "pad_id": 0, "files": {"model": "model.onnx", "int8": "model.int8.onnx"}, "decision": {},
        "max_new_tokens": 64,
        "prompt_format": {"eos_token_ids": [2], "bos_token": None, "eos_token": "</s>", "chat_template": chat_template},
    }
    (directory / "bundle.json").write_text(json.dumps(meta), encoding="utf-8")
    (directory / "export_report.json").write_text("{}", encoding="utf-8")
    (directory / "config.json").write_text("{}", encoding="utf-8")
    word_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tfsft.export_decoder import export_decoder

    directory = tmp_path_factory.mktemp("causal_bundle")
    export_decoder(tiny_model("mistral"), directory / "model.onnx", PROMPTS, max_new_tokens=4,
                   int8_path=directory / "model.int8.onnx")
    return write_bundle(directory, CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def plain_bundle(bundle, tmp_path_factory) -> Path:
    """The same model without a chat template."""
    directory = tmp_path_factory.mktemp("plain_bundle")
    for name in ("model.onnx", "model.int8.onnx"):
        shutil.copy(bundle / name, directory / name)
    return write_bundle(directory, None)


@pytest.fixture(scope="module")
def predictor(bundle):
    from tfsft.inference import Predictor

    return Predictor(bundle, batch_size=2)


def token_ids(text: str) -> list[int]:
    return [len(SPECIALS) + WORDS.index(word) for word in text.split()]


# ------------------------------------------------------------------------------------ Predictor


def test_generate_is_the_decoder_loop_on_the_prompts_token_ids(predictor, bundle):
    from tfsft.tasks.causal_lm import decode_generation

    assert predictor.generates and predictor.model_path.name == "model.onnx" and predictor.max_new_tokens == 64
    assert predictor.prompt_ids(TEXTS, NEW) == [token_ids(text) for text in TEXTS]
    reference = generate(DecoderSession(bundle / "model.onnx"), [token_ids(t) for t in TEXTS], NEW, eos_token_id=2)
    generations = predictor.generate(TEXTS, max_new_tokens=NEW)
    assert [list(g.tokens) for g in generations] == [r.tokens for r in reference]
    assert [g.finish_reason for g in generations] == [r.finish_reason for r in reference]
    assert {g.finish_reason for g in generations} == {FINISH_EOS, FINISH_LENGTH}
    tokenizer = word_tokenizer()
    assert [g.text for g in generations] == [decode_generation(tokenizer, r.tokens) for r in reference]
    assert generations[0].to_dict() == {"generated": generations[0].text, "finish_reason": generations[0].finish_reason}
    assert predictor.predict(TEXTS[:2]) == predictor.generate(TEXTS[:2], max_new_tokens=64)


def test_a_batch_equals_one_prompt_at_a_time_and_sampling_is_seeded(predictor):
    assert predictor.batch_size == 2 < len(TEXTS)
    batched = predictor.generate(TEXTS, max_new_tokens=NEW)
    assert batched == [predictor.generate([text], max_new_tokens=NEW)[0] for text in TEXTS]
    sampled = predictor.generate(TEXTS, max_new_tokens=NEW, temperature=1.5, seed=3)
    assert predictor.generate(TEXTS, max_new_tokens=NEW, temperature=1.5, seed=3) == sampled
    assert sampled != batched


def test_stop_strings_end_rows_and_cut_the_text(predictor):
    free = predictor.generate([TEXTS[0]], max_new_tokens=NEW)[0]
    words = [t for t in free.tokens if t >= len(SPECIALS)]
    word = (SPECIALS + WORDS)[words[2]]
    first = free.tokens.index(words[2])
    stopped = predictor.generate([TEXTS[0]], max_new_tokens=NEW, stop=[word])[0]
    assert stopped.finish_reason == FINISH_STOP and stopped.tokens == free.tokens[:first], "a token sequence stop"
    assert stopped.text == free.text[: free.text.index(word)].strip()
    # A stop string no token sequence makes (it starts inside a word): the decoded text ends the row.
    across = free.text.split()[1][1:] + " " + free.text.split()[2][:2]
    cut = predictor.generate([TEXTS[0]], max_new_tokens=NEW, stop=across)[0]
    assert cut.finish_reason == FINISH_STOP and cut.text == free.text[: free.text.index(across)].strip()
    assert len(cut.tokens) < len(free.tokens) and free.tokens[: len(cut.tokens)] == cut.tokens
    unused = predictor.generate([TEXTS[0]], max_new_tokens=NEW, stop=["w63 w63 w63"])[0]
    assert unused == free


def test_chat_prompts_are_rendered_with_the_bundle_template(predictor, plain_bundle):
    from tfsft.inference import Predictor, PromptError

    chat = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
            {"role": "user", "content": "w4"}]
    rendered = "<|user|> w1 w2 <|assistant|> w3 </s> <|user|> w4 <|assistant|> "
    assert predictor.prompt_ids([chat], NEW) == predictor.prompt_ids([rendered], NEW) == [[4, 7, 8, 5, 9, 2, 4, 10, 5]]
    assert predictor.generate([chat, "w1"], max_new_tokens=NEW) == predictor.generate([rendered, "w1"],
                                                                                      max_new_tokens=NEW)
    with pytest.raises(PromptError, match=r"^prompt 1 is not a chat conversation .*role 'robot'"):
        predictor.generate(["w1", [{"role": "robot", "content": "w1"}]])
    with pytest.raises(PromptError, match="^prompt 0 is a chat conversation, but the model has no chat template"):
        Predictor(plain_bundle).generate([chat])


def test_prompts_too_long_for_the_new_tokens_name_their_index(predictor):
    from tfsft.inference import PromptError

    with pytest.raises(PromptError, match=r"^prompt 1 has 70 tokens; at most 64 fit before max_new_tokens=64") as error:
        predictor.generate(["w1", LONG])
    assert error.value.index == 1 and isinstance(error.value, DataError)
    assert len(predictor.generate([LONG], max_new_tokens=40)[0].tokens) <= 40
    with pytest.raises(ConfigError, match="max_new_tokens must be at most 127"):
        predictor.generate(["w1"], max_new_tokens=128)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts="w1 w2"), "prompts must be a list"),
        (dict(prompts=["w1", "  "]), "prompt 1 is empty"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(stop=["w1", ""]), r"stop\[1\] must be a non-empty string"),
        (dict(seed="7"), "seed='7'"),
    ],
)
def test_bad_generate_arguments_are_one_line_errors(predictor, kwargs, message):
    arguments = dict(prompts=["w1"]) | kwargs
    with pytest.raises((ConfigError, DataError), match=message) as raised:
        predictor.generate(**arguments)
    assert "\n" not in str(raised.value)


def test_int8_model_generates_too(bundle):
    from tfsft.inference import Bundle, Predictor, choose_precision

    int8 = Predictor(bundle, int8=True)
    assert int8.model_path.name == "model.int8.onnx"
    assert all(len(g.tokens) <= 4 for g in int8.generate(TEXTS, max_new_tokens=4))
    assert not choose_precision(Bundle.load(bundle)).int8, "no int8 score drop recorded: fp32"


# ------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("stop", [(), ("w4",), ("w23 w1", "w30")])
def test_stream_pieces_join_to_the_generated_text(predictor, stop):
    from tfsft.inference import Generation

    for prompt in TEXTS:
        events = list(predictor.stream(prompt, max_new_tokens=NEW, stop=stop))
        final = events[-1]
        assert isinstance(final, Generation) and all(isinstance(e, str) for e in events[:-1])
        assert final == predictor.generate([prompt], max_new_tokens=NEW, stop=stop)[0]
        assert "".join(events[:-1]) == final.text
        if len(final.text.split()) > 2 and not stop:
            assert len(events) > 3, "pieces come as tokens are generated"


def test_stream_checks_its_arguments_before_the_first_step(predictor):
    with pytest.raises(DataError, match="prompt 0 has 70 tokens"):
        predictor.stream(LONG)


def test_streamable_text_holds_back_what_may_change():
    from tfsft.inference import streamable_text

    assert streamable_text("  w1 w2 ", []) == "w1 w2"
    assert streamable_text("caf\ufffd", []) is None, "a character whose bytes have not all come"
    assert streamable_text("w1 w2 ST", ["STOP"]) == "w1 w2", "the start of a stop string waits"
    assert streamable_text("w1 STOP w2", ["STOP"]) == "w1"
    assert streamable_text("w1 w2", ["w2 w3"]) == "w1"


# ------------------------------------------------------------------------------------ predict CLI


def predict_cli(*args: str) -> None:
    from tfsft.commands.predict import build_parser, run

    run(build_parser().parse_args(list(args)))


def test_predict_writes_generations_for_prompt_and_chat_records(predictor, bundle, tmp_path):
    chat = [{"role": "user", "content": "w1 w2"}]
    records = [{"prompt": TEXTS[0]}, {"messages": chat}, TEXTS[2]]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    predict_cli(str(bundle), "--input", str(source), "--output", str(out), "--max_new_tokens", "6", "--batch_size", "2")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = predictor.generate([TEXTS[0], chat, TEXTS[2]], max_new_tokens=6)
    assert rows == [g.to_dict() for g in expected]

    table = tmp_path / "prompts.csv"
    table.write_text("id,prompt\n1,w1 w2 w3\n2,w9\n", encoding="utf-8")
    predict_cli(str(bundle), "--input", str(table), "--output", str(tmp_path / "out.csv"), "--output_format", "csv")
    lines = (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "generated" and lines[1:] == [g.text for g in predictor.generate(["w1 w2 w3", "w9"])]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"other": "w1"}', "line 2: no prompt; expected a 'prompt' string or 'messages'"),
        ('{"prompt": 3}', "line 2: field 'prompt' must be a non-empty string"),
        ('{"messages": [{"role": "user"}]}', "line 2: 'messages': message 0 must be an object"),
        (json.dumps({"prompt": LONG}), "line 2: the prompt has 70 tokens"),
    ],
)
def test_predict_names_the_line_of_a_bad_record(bundle, tmp_path, line, message):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "w1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        predict_cli(str(bundle), "--input", str(source), "--output", str(tmp_path / "out.jsonl"))


def test_predict_script_on_a_causal_bundle(bundle, tmp_path):
    """The script as users run it: one line per prompt, and a bad flag combination is one line."""
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "w1 w2"}\n', encoding="utf-8")
    result = run_script("predict.py", str(bundle), "--input", str(source), "--max_new_tokens", "3", timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert set(row) == {"generated", "finish_reason"} and row["finish_reason"] in {FINISH_EOS, FINISH_LENGTH}
    result = run_script("predict.py", str(bundle), "--input", str(source), "--max_new_tokens", "200", timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: max_new_tokens must be at most 127"), result.stderr


# ------------------------------------------------------------------------------------ /generate


def sse_events(text: str) -> list:
    """The data of each server-sent event: parsed JSON, or the final "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def client(predictor):
    from starlette.testclient import TestClient

    from tfsft.serving import Limits, create_app

    with TestClient(create_app(predictor, Limits(max_texts=4, max_chars=300))) as client:
        yield client


def test_generate_endpoint_answers_in_prompt_order(client, predictor):
    chat = [{"role": "user", "content": "w1 w2"}]
    body = {"prompts": [TEXTS[0], chat, TEXTS[3]], "max_new_tokens": 6, "stop": ["w30"]}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    expected = predictor.generate([TEXTS[0], chat, TEXTS[3]], max_new_tokens=6, stop=["w30"])
    assert response.json() == {"generations": [{"text": g.text, "finish_reason": g.finish_reason} for g in expected]}
    sampled = {"prompts": TEXTS[:2], "temperature": 1.5, "top_p": 0.9, "seed": 3}
    assert client.post("/generate", json=sampled).json() == client.post("/generate", json=sampled).json()
    meta = client.get("/metadata").json()
    assert meta["task"] == "causal_lm" and meta["labels"] == []
    assert meta["generation"] == {"endpoint": "/generate", "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0,
                                  "eos_token_ids": [2], "chat_template": True}


def test_generate_streams_server_sent_events(client, predictor):
    from test_serving import scrape

    body = {"prompts": [TEXTS[0]], "max_new_tokens": NEW, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events("".join(response.iter_text()))
    expected = predictor.generate([TEXTS[0]], max_new_tokens=NEW)[0]
    assert events[-1] == "[DONE]" and events[-2] == {"finish_reason": expected.finish_reason, "text": expected.text}
    assert len(events) > 3 and "".join(e["text"] for e in events[:-2]) == expected.text
    samples = scrape(client.get("/metrics").text)
    assert samples[("tfsft_texts_in_flight", ())] == 0, "the stream's prompt left the count when it ended"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prompts": []}, 400, '"prompts" is empty'),
        ({"prompts": "w1"}, 400, '"prompts" must be a list'),
        ({"texts": ["w1"]}, 400, "unknown field(s) ['texts']"),
        ({"prompts": ["w1", 3]}, 400, '"prompts"[1] must be a string or a list'),
        ({"prompts": ["w1", " "]}, 400, '"prompts"[1] is empty'),
        ({"prompts": [[{"role": "user"}]]}, 400, '"prompts"[0]: message 0 must be an object'),
        ({"prompts": ["w1"], "max_new_tokens": 0}, 400, '"max_new_tokens" must be a positive integer'),
        ({"prompts": ["w1"], "max_new_tokens": 500}, 400, "max_new_tokens must be at most 127"),
        ({"prompts": ["w1"], "temperature": -1}, 400, '"temperature" must be a number >= 0'),
        ({"prompts": ["w1"], "top_p": 0}, 400, '"top_p" must be a number in (0, 1]'),
        ({"prompts": ["w1"], "stop": ["w2", ""]}, 400, '"stop"[1] must be a non-empty string'),
        ({"prompts": ["w1"], "seed": "x"}, 400, '"seed" must be an integer'),
        ({"prompts": ["w1"], "stream": "yes"}, 400, '"stream" must be true or false'),
        ({"prompts": ["w1", "w2"], "stream": True}, 400, '"stream": true takes exactly one prompt'),
        ({"prompts": ["w1", LONG]}, 400, '"prompts"[1] has 70 tokens'),
        ({"prompts": [LONG], "stream": True}, 400, '"prompts"[0] has 70 tokens'),
        ({"prompts": ["w1"] * 5}, 413, "at most 4 per request"),
        ({"prompts": ["w1 " * 101]}, 413, '"prompts"[0] has 303 characters; at most 300'),
    ],
)
def test_bad_generate_bodies_name_the_field(client, body, status, message):
    response = client.post("/generate", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_generate_refusals_are_counted_and_predict_points_to_generate(client):
    from test_serving import scrape

    before = scrape(client.get("/metrics").text)
    assert client.post("/generate", content=b"{not json").status_code == 400
    assert client.post("/generate", json={"prompts": ["w1"], "max_new_tokens": 2}).status_code == 200
    response = client.post("/predict", json={"texts": ["w1"]})
    assert response.status_code == 400 and "POST /generate" in response.json()["error"]
    assert client.post("/predict", json={"prompts": ["w1"]}).status_code == 400
    after = scrape(client.get("/metrics").text)

    def count(name, endpoint, status):
        key = (name, (("endpoint", endpoint), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert count("tfsft_requests_total", "/generate", "400") == 1
    assert count("tfsft_requests_total", "/generate", "200") == 1
    assert count("tfsft_errors_total", "/predict", "400") == 2
    assert after[("tfsft_texts_total", ())] - before[("tfsft_texts_total", ())] == 1


def test_a_base_install_serves_the_bundle(bundle, tmp_path):
    """Without TensorFlow, transformers or any other [train] package: the Predictor, a stream and
    /generate."""
    code = (
        "import sys; from starlette.testclient import TestClient; from tfsft.inference import Predictor; "
        "from tfsft.serving import create_app; "
        f"p = Predictor({str(bundle)!r}); pieces = list(p.stream('w9', max_new_tokens=4)); "
        "r = TestClient(create_app(p)).post('/generate', json={'prompts': ['w9'], 'max_new_tokens': 4}).json(); "
        "assert r['generations'][0]['text'] == pieces[-1].text, (r, pieces); "
        "print(sorted(m for m in ('tensorflow', 'transformers', 'tf2onnx', 'onnx') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env=env_without_training_packages(tmp_path / "site"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
