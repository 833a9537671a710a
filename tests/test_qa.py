"""Extractive QA without TensorFlow (tfsft.tasks.qa): the three readers and their errors, the official
SQuAD metrics, question + context windows (checked against the tokenizers library's own
overflowing windows and run_qa's answer positions) and span decoding (checked against a brute
force search), on the MiniLM WordPiece tokenizer, a byte-level BPE and the first SQuAD dev articles."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import env_without_training_packages, shared_path
from tfsft.checkpoint import embedded_checkpoint
from tfsft.errors import DataError
from tfsft.tasks.qa import (
    QAExamples,
    SpanPrediction,
    best_spans,
    exact_match,
    make_windows,
    normalize_answer,
    read_qa_examples,
    squad_scores,
    squad_v2_scores,
    token_f1,
)
from tfsft.tokenize import TextEncoder

DEV_ARTICLES = 6
"""Super_Bowl_50 to Teacher: 2,145 dev questions with up to 3+ gold answers each."""


def minilm(max_length: int) -> TextEncoder:
    return TextEncoder.from_file(embedded_checkpoint() / "tokenizer.json", max_length)


@pytest.fixture(scope="module")
def dev_document() -> dict:
    document = json.loads(shared_path("squad-v1.1", "dev-v1.1.json").read_text(encoding="utf-8"))
    return {"version": document["version"], "data": document["data"][:DEV_ARTICLES]}


@pytest.fixture(scope="module")
def dev_file(dev_document, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("squad") / "dev.json"
    path.write_text(json.dumps(dev_document), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dev(dev_file) -> QAExamples:
    return read_qa_examples(str(dev_file))


def byte_level_bpe(lines: list[str], trim_offsets: bool):
    """A tiny byte-level BPE (RoBERTa's kind) trained on `lines`; with trim_offsets=False (GPT-2's
    post-processor) a token's offsets include the space it carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if trim_offsets:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def plain(tokenizer):
    """A copy of a tokenizer that does not truncate (a TextEncoder turns truncation on)."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    return copy


def stripped(context: str, start: int, end: int) -> tuple[int, int]:
    """[start, end) without the whitespace at either end."""
    text = context[start:end]
    return start + len(text) - len(text.lstrip()), end - len(text) + len(text.rstrip())


def gold_logits(windows) -> np.ndarray:
    """Logits a perfect model would give: +10 at the gold start and end of every window."""
    logits = np.zeros((len(windows), int(windows.encoded.lengths.max()), 2), dtype=np.float32)
    rows = np.arange(len(windows))
    logits[rows, windows.positions[:, 0], 0] += 10.0
    logits[rows, windows.positions[:, 1], 1] += 10.0
    return logits


def context_tokens(windows, w: int) -> np.ndarray:
    """Token indices of window `w` that belong to the context."""
    return np.flatnonzero(windows.offsets[w][:, 0] >= 0)


# ---------------------------------------------------------------------------------------- readers


def test_reads_the_official_squad_json(dev, dev_document):
    raw = [
        (qa, paragraph["context"]) for article in dev_document["data"]
        for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    ]
    assert len(dev) == len(raw) > 1000
    assert dev.ids == [qa["id"] for qa, _ in raw]
    assert dev.texts == dev.questions == [qa["question"] for qa, _ in raw]
    assert dev.contexts == [context for _, context in raw]
    assert dev.answers[0] == [(a["text"], a["answer_start"]) for a in raw[0][0]["answers"]]
    assert max(len(answers) for answers in dev.answers) >= 3
    assert all(context[start : start + len(text)] == text
               for context, answers in zip(dev.contexts, dev.answers) for text, start in answers)
    assert dev.answer_texts()[5] == [a["text"] for a in raw[5][0]["answers"]]
    part = dev.subset([3, 1])
    assert part.ids == [dev.ids[3], dev.ids[1]] and part.answers == [dev.answers[3], dev.answers[1]]


def test_reads_hub_jsonl_rows_in_both_answer_layouts(dev, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = []
    for i in range(30):
        answers = {"text": [t for t, _ in dev.answers[i]], "answer_start": [s for _, s in dev.answers[i]]}
        if i % 2:
            answers = [{"text": t, "answer_start": s} for t, s in dev.answers[i]]
        rows.append({"id": dev.ids[i], "question": dev.questions[i], "context": dev.contexts[i], "answers": answers})
    rows.append({"question": "Who?", "context": "Nobody knows."})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    examples = read_qa_examples(str(path))
    expected = dev.subset(range(30))
    first = examples.subset(range(30))
    assert (first.ids, first.questions, first.contexts, first.answers) == \
        (expected.ids, expected.questions, expected.contexts, expected.answers)
    assert (examples.ids[-1], examples.answers[-1]) == ("31", [])
    renamed = tmp_path / "renamed.json"  # JSON Lines named .json, as `datasets` writes them
    row = {"q": "Who?", "passage": "Ann did.", "gold": {"text": ["Ann"], "answer_start": [0]}}
    renamed.write_text(json.dumps(row) + "\n" + json.dumps({**row, "gold": {"text": [], "answer_start": []}}))
    examples = read_qa_examples(str(renamed), question_column="q", context_column="passage", answers_column="gold")
    assert (examples.questions, examples.answers) == (["Who?"] * 2, [[("Ann", 0)], []])


def test_reads_csv_with_answers_and_tsv_without(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "question", "context", "answer_text", "answer_start"])
        writer.writerow(["a1", "Who won?", 'The Broncos won, "easily", in 2016.', "The Broncos", "0"])
        writer.writerow(["", "When?", 'The Broncos won, "easily", in 2016.', "2016", "30"])
        writer.writerow(["a3", "Why?", "Nobody knows.", "", ""])
    examples = read_qa_examples(str(path))
    assert examples.ids == ["a1", "3", "a3"]
    assert examples.answers == [[("The Broncos", 0)], [("2016", 30)], []]
    tsv = tmp_path / "qa.tsv"
    tsv.write_text("question\tcontext\nWho won?\tThe Broncos won.\n", encoding="utf-8")
    examples = read_qa_examples(str(tsv))
    assert (examples.ids, examples.questions, examples.answers) == (["2"], ["Who won?"], [[]])
    assert examples.source == str(tsv)


def test_squad_v2_unanswerable_questions_have_no_answers(tmp_path):
    """SQuAD v2 marks them is_impossible, with empty answers (their plausible_answers are not gold)."""
    document = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Ann met Bob.", "qas": [
        {"id": "q1", "question": "Who met Bob?", "answers": [{"text": "Ann", "answer_start": 0}],
         "is_impossible": False},
        {"id": "q2", "question": "Who met Carl?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Ann", "answer_start": 0}]},
    ]}]}]}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    assert read_qa_examples(str(path)).answers == [[("Ann", 0)], []]


def test_answers_off_by_surrounding_whitespace_are_moved_onto_the_text(tmp_path):
    context = "Super Bowl 50 was won by  the Denver Broncos ."
    start = context.index("the Denver")
    rows = [
        {"question": question, "context": context, "answers": [{"text": text, "answer_start": at}]}
        for question, text, at in [
            ("a?", " the Denver Broncos ", start - 1), ("b?", "the Denver Broncos", start - 2),
            ("c?", "Broncos", len(context) - 1),
        ]
    ]
    path = tmp_path / "ws.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"row 3: field 'answers': answer 'Broncos' is not at answer_start"):
        read_qa_examples(str(path))
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]), encoding="utf-8")
    examples = read_qa_examples(str(path))
    assert examples.answers == [[("the Denver Broncos", start)], [("the Denver Broncos", start)]]


SQUAD_ROW = {"id": "q7", "question": "Who?", "context": "Ann met Bob.", "answers": [{"text": "Ann", "answer_start": 0}]}


def squad_json(**qa) -> str:
    return json.dumps({"data": [{"paragraphs": [{"context": qa.pop("context", "Ann met Bob."), "qas": [
        {"id": "q0", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}, {**SQUAD_ROW, **qa},
    ]}]}]})


BAD_INPUTS = [
    ("missing.json", None, r"missing\.json: file not found"),
    ("bad.json", squad_json()[:-30], r"bad\.json: malformed JSON \(.*line 1 column"),
    ("noq.json", squad_json(question=None),
     r"noq\.json: question id q7 \(data\[0\]\.paragraphs\[0\]\.qas\[1\]\): missing field 'question'"),
    ("empty.json", squad_json(context="  "), r"empty\.json: question id q0 .*: empty 'context'"),
    ("start.json", squad_json(answers=[{"text": "Ann", "answer_start": "zero"}]),
     r"question id q7 .*: field 'answers': answer_start must be an integer, found 'zero'"),
    ("moved.json", squad_json(answers=[{"text": "Bob", "answer_start": 0}]),
     r"question id q7 .*: field 'answers': answer 'Bob' is not at answer_start 0 of the context "
     r"\(it reads 'Ann' there\)"),
    ("none.json", json.dumps({"version": "1.1", "data": []}), r"none\.json: no questions found"),
    ("rows.jsonl", json.dumps(SQUAD_ROW) + "\n{oops\n", r"rows\.jsonl: row 2: malformed JSON"),
    ("rows2.jsonl", json.dumps(SQUAD_ROW) + "\n" + json.dumps({**SQUAD_ROW, "context": 3}),
     r"rows2\.jsonl: row 2: field 'context' is a int, not a string"),
    ("rows3.jsonl", json.dumps({**SQUAD_ROW, "answers": {"text": ["Ann"], "answer_start": []}}),
     r"rows3\.jsonl: row 1: field 'answers' must hold lists 'text' and 'answer_start' of equal length"),
    ("cols.csv", "question,passage\nWho?,Ann met Bob.\n", r"cols\.csv: row 1: no column 'context' in the header"),
    ("half.csv", "question,context,answer_text\nWho?,Ann met Bob.,Ann\n",
     r"half\.csv: row 1: column 'answer_text' needs a column 'answer_start' too"),
    ("start.csv", "question,context,answer_text,answer_start\nWho?,Ann met Bob.,Ann,0\nWho?,Ann met Bob.,Ann,first\n",
     r"start\.csv: row 3: field 'answer_text/answer_start': answer_start must be an integer, found 'first'"),
    ("blank.tsv", "question\tcontext\n \tAnn met Bob.\n", r"blank\.tsv: row 2: empty 'question'"),
]


@pytest.mark.parametrize("name, content, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_name_the_file_the_row_and_the_field(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        read_qa_examples(str(path))
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------- metrics


def test_normalisation_is_the_official_one():
    assert normalize_answer("  The Denver  Broncos!") == "denver broncos"
    assert normalize_answer("An apple, a day; the end.") == "apple day end"
    assert normalize_answer("Theory of anything") == "theory of anything"
    assert normalize_answer("U.S.-based") == "usbased"
    assert normalize_answer("the") == "" and normalize_answer("") == ""


def test_exact_match_and_token_f1_by_hand():
    assert exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "") == 1.0 and token_f1("", "cat") == 0.0


def test_squad_scores_take_the_best_gold_and_return_fractions():
    predictions = ["Denver Broncos", "the cat", "dog", "", "something"]
    golds = [["Broncos", "denver broncos"], ["cat sat", "a mat"], ["cat"], [], []]
    scores = squad_scores(predictions, golds)
    assert scores["exact_match"] == pytest.approx((1 + 0 + 0 + 1 + 0) / 5)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 0) / 5)
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        squad_scores(["a", "b"], [["a"]])


def prediction(answer: str, score: float, null_score: float) -> SpanPrediction:
    return SpanPrediction(answer, 0, len(answer), score, null_score)


def test_squad_v2_threshold_maximises_f1_on_a_hand_example():
    predictions = [
        prediction("Denver Broncos", 5.0, 3.0),  # answerable, right: null - score = -2
        prediction("Carolina", 1.0, 2.0),        # unanswerable: 1
        prediction("the Broncos won", 2.0, 2.0),  # answerable, F1 0.5 against "Broncos lost": 0
        prediction("Oakland", 1.5, 2.0),          # unanswerable: 0.5
    ]
    golds = [["Denver Broncos"], [], ["Broncos lost"], []]
    # answered in order of the gap: F1 sums 2 (all null), 3, 3.5, 2.5, 1.5: the best answers the first two
    metrics, threshold = squad_v2_scores(predictions, golds)
    assert threshold == 0.0
    assert metrics == pytest.approx({
        "exact_match": 3 / 4, "f1": 3.5 / 4, "has_ans_exact_match": 1 / 2, "has_ans_f1": 0.75,
        "no_ans_exact_match": 1.0, "no_ans_f1": 1.0, "best_f1_threshold": 0.0,
    })
    metrics, threshold = squad_v2_scores([prediction("Oakland", 1.0, 0.0), prediction("x", 1.0, 0.5)], [[], ["y"]])
    assert threshold < -1.0 and (metrics["no_ans_f1"], metrics["has_ans_f1"], metrics["f1"]) == (1.0, 0.0, 0.5)


def test_squad_v2_threshold_never_splits_questions_with_equal_gaps():
    """A threshold answers every question with the same gap or none: the search must not stop
    between them (here, stopping after the first of the tied pair would look best)."""
    predictions = [prediction("Ann", 1.0, 1.5), prediction("Bob", 1.0, 1.5), prediction("Cy", 1.0, 1.0)]
    metrics, threshold = squad_v2_scores(predictions, [["Ann"], [], ["Cy"]])
    assert threshold == 0.0 and metrics["f1"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------- windows

FILLER = [
    "The weather was mild that spring in the valley.", "Farmers planted barley along the river banks.",
    "A small school opened near the market square.", "Merchants traded wool for salt and copper.",
    "The old bridge was repaired by the guild.", "Children played games beside the fountain.",
    "Travelers rested at the inn before the pass.", "Musicians performed at the harvest festival.",
    "The mayor spoke about taxes and roads.", "Snow closed the mountain road in winter.",
    "Fishermen sold their catch at dawn.", "The library kept maps of distant lands.",
]
ANSWER = "under the crooked oak tree"
LONG_CONTEXT = " ".join(FILLER[:9]) + f" The treasure was buried {ANSWER} by the mill. " + " ".join(FILLER[9:])
LONG_QUESTION = "Where was the treasure buried?"


@pytest.fixture(scope="module")
def long_example() -> QAExamples:
    return QAExamples(["t"], [LONG_QUESTION], [LONG_CONTEXT], [[(ANSWER, LONG_CONTEXT.index(ANSWER))]])


def test_a_long_context_is_cut_into_overlapping_windows(long_example):
    encoder = minilm(64)
    windows = make_windows(encoder, long_example, doc_stride=16)
    assert len(windows) >= 3 and windows.example_index.tolist() == [0] * len(windows)
    assert all(length <= 64 for length in windows.encoded.lengths) and not windows.encoded.truncated.any()
    question = encoder.tokenizer.encode(LONG_QUESTION, add_special_tokens=False).ids
    cls, sep = encoder.tokenizer.token_to_id("[CLS]"), encoder.tokenizer.token_to_id("[SEP]")
    for w in range(len(windows)):
        ids, types = windows.encoded.input_ids[w].tolist(), windows.encoded.token_type_ids[w].tolist()
        inside = context_tokens(windows, w)
        assert ids[: len(question) + 2] == [cls, *question, sep] and ids[-1] == sep
        assert inside.tolist() == list(range(len(question) + 2, len(ids) - 1))
        assert types == [0] * (len(question) + 2) + [1] * (len(ids) - len(question) - 2)
    pieces = [windows.offsets[w][context_tokens(windows, w)] for w in range(len(windows))]
    for before, after in zip(pieces, pieces[1:]):
        assert np.array_equal(before[-16:], after[:16]) and after[16, 0] > before[-1, 0]
    whole = plain(encoder.tokenizer).encode(LONG_CONTEXT, add_special_tokens=False).offsets
    covered = np.unique(np.concatenate(pieces), axis=0)
    assert [tuple(o) for o in covered.tolist()] == sorted(set(whole)) and tuple(pieces[-1][-1]) == whole[-1]


def test_windows_tokenize_with_the_encoders_own_untruncated_copy(long_example):
    """No tokenizer copy per call: a Predictor answering one question at a time would spend
    most of each request copying it."""
    encoder = minilm(64)
    batches = []

    class Recording:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def encode_batch(self, texts, **kwargs):
            batches.append(len(texts))
            return self.tokenizer.encode_batch(texts, **kwargs)

    expected = make_windows(encoder, long_example, doc_stride=16)
    encoder.__dict__["untruncated"] = Recording(encoder.untruncated)
    for _ in range(2):
        windows = make_windows(encoder, long_example, doc_stride=16)
        assert [ids.tolist() for ids in windows.encoded.input_ids] == [ids.tolist() for ids in expected.encoded.input_ids]
    assert batches == [1, 1, 1, 1]


def test_gold_positions_point_at_the_answer_in_the_second_window_only(long_example):
    windows = make_windows(minilm(64), long_example, doc_stride=16)
    start = LONG_CONTEXT.index(ANSWER)
    assert windows.positions[0].tolist() == [0, 0]
    s, e = windows.positions[1]
    assert 0 < s <= e
    offsets = windows.offsets[1]
    assert (offsets[s, 0], offsets[e, 1]) == (start, start + len(ANSWER))
    assert offsets[s - 1, 1] <= start and offsets[e + 1, 0] >= start + len(ANSWER)
    assert windows.positions.dtype == np.int32 and windows.example_index.dtype == np.int64
    assert windows.offsets[1].dtype == np.int64 and windows.offsets[1][0].tolist() == [-1, -1]
    part = windows.subset([1])
    assert part.positions.tolist() == [[s, e]] and part.example_index.tolist() == [0]


@pytest.mark.parametrize("family", ["wordpiece", "byte-level-bpe"])
def test_windows_and_positions_match_the_tokenizers_overflow_and_run_qa(family, dev):
    """Windows equal what `only_second` truncation with a stride returns (run_qa's windows), and
    gold positions cover the characters run_qa's search for the answer's first and last token
    covers. Token indices may differ for a character of several byte-level tokens (run_qa ends on
    its first token, tfsft on its last), and the tokenizers library leaves the leading space in
    the offsets of the first token of an overflowing window: so spans are compared without
    surrounding whitespace."""
    from tokenizers import Tokenizer

    examples = dev.subset(range(120))
    if family == "wordpiece":
        encoder = minilm(96)
    else:
        encoder = TextEncoder(byte_level_bpe(dev.contexts[::25] + dev.questions[::5], trim_offsets=True), 96)
    windows = make_windows(encoder, examples, doc_stride=24)
    reference = Tokenizer.from_str(encoder.tokenizer.to_str())
    reference.enable_truncation(96, stride=24, strategy="only_second")
    expected = []
    for i, encoding in enumerate(reference.encode_batch(list(zip([q.lstrip() for q in examples.questions],
                                                                   examples.contexts)))):
        text, start = examples.answers[i][0]
        for window in [encoding, *encoding.overflowing]:
            offsets, inside = window.offsets, [t for t, s in enumerate(window.sequence_ids) if s == 1]
            span = None
            if offsets[inside[0]][0] <= start and offsets[inside[-1]][1] >= start + len(text):
                first = max(t for t in inside if offsets[t][0] <= start)
                last = min(t for t in inside if offsets[t][1] >= start + len(text))
                span = stripped(examples.contexts[i], offsets[first][0], offsets[last][1])
            expected.append((i, window.ids, window.type_ids, span))
    assert len(windows) == len(expected) > len(examples)
    assert windows.example_index.tolist() == [i for i, *_ in expected]
    assert [ids.tolist() for ids in windows.encoded.input_ids] == [ids for _, ids, _, _ in expected]
    assert [types.tolist() for types in windows.encoded.token_type_ids] == [types for _, _, types, _ in expected]
    spans = [None if s == e == 0 else stripped(examples.contexts[i], offsets[s, 0], offsets[e, 1])
             for i, offsets, (s, e) in zip(windows.example_index, windows.offsets, windows.positions)]
    assert spans == [span for *_, span in expected] and 0 < spans.count(None) < len(spans)


def test_long_questions_are_cut_and_lose_leading_whitespace(long_example):
    encoder = minilm(64)
    long = QAExamples(["q"], ["   " + " ".join(["why"] * 100) + "?"], [LONG_CONTEXT], [[]])
    windows = make_windows(encoder, long, doc_stride=8, max_question_tokens=20)
    why, sep = encoder.tokenizer.token_to_id("why"), encoder.tokenizer.token_to_id("[SEP]")
    assert all(ids[1:22].tolist() == [why] * 20 + [sep] for ids in windows.encoded.input_ids)
    assert len(windows) > 1 and windows.positions.tolist() == [[0, 0]] * len(windows)
    capped = make_windows(encoder, long, doc_stride=8, max_question_tokens=500)
    assert all(len(context_tokens(capped, w)) >= 64 // 2 - 2 for w in range(len(capped) - 1))
    padded = QAExamples(["p"], ["\n\t  " + LONG_QUESTION], [LONG_CONTEXT], long_example.answers)
    bpe = TextEncoder(byte_level_bpe(FILLER + [LONG_QUESTION], trim_offsets=True), 64)
    assert [ids.tolist() for ids in make_windows(bpe, padded, doc_stride=16).encoded.input_ids] == \
        [ids.tolist() for ids in make_windows(bpe, long_example, doc_stride=16).encoded.input_ids]


def test_a_stride_that_leaves_no_room_is_lowered_with_a_warning(long_example):
    with pytest.warns(UserWarning, match="doc_stride=128 leaves no room"):
        windows = make_windows(minilm(64), long_example, doc_stride=128)
    assert all(length <= 64 for length in windows.encoded.lengths)
    assert windows.positions.any(axis=1).sum() >= 1
    with pytest.raises(ValueError, match="no room for a question and a context"):
        make_windows(minilm(4), long_example)


# --------------------------------------------------------------------------------------- decoding


def test_logits_peaking_at_the_answer_in_window_two_decode_to_its_substring(long_example):
    windows = make_windows(minilm(64), long_example, doc_stride=16)
    s, e = windows.positions[1]
    logits = np.zeros((len(windows), 70, 2), dtype=np.float32)
    logits[1, s, 0], logits[1, e, 1] = 6.0, 5.0
    first = context_tokens(windows, 0)
    logits[0, first[3], 0], logits[0, first[5], 1] = 4.0, 4.0
    logits[:, 0, :] = -1.0
    start = LONG_CONTEXT.index(ANSWER)
    for given in (logits, [logits[w, : windows.encoded.lengths[w]] for w in range(len(windows))]):
        (answer,) = best_spans(given, windows, long_example)
        assert (answer.answer, answer.start, answer.end) == (ANSWER, start, start + len(ANSWER))
        assert answer.score == pytest.approx(11.0) and answer.null_score == pytest.approx(-2.0)
        assert answer.to_dict() == {"answer": ANSWER, "start": start, "end": start + len(ANSWER), "score": 11.0}


TRAPS = {
    "question tokens": ([("q", 50.0, 50.0)], 0.0),
    "end before start": ([(10, 20.0, None), (4, None, 20.0)], 20.0),
    "longer than max_answer_length": ([(0, 15.0, None), (40, None, 15.0)], 15.0),
    "across windows": ([(-1, 12.0, None), ("second", None, 12.0)], 12.0),
}


@pytest.mark.parametrize("trap", list(TRAPS))
def test_spans_never_leave_the_context_reverse_run_long_or_cross_windows(long_example, trap):
    """Logits that peak at an invalid pair: the answer is the best valid span instead."""
    windows = make_windows(minilm(64), long_example, doc_stride=16)
    first, second = context_tokens(windows, 0), context_tokens(windows, 1)
    logits = np.zeros((len(windows), 64, 2))
    peaks, expected = TRAPS[trap]
    for where, start, end in peaks:
        window, token = (1, second[20]) if where == "second" else (0, slice(1, 4) if where == "q" else first[where])
        logits[window, token, 0] += start or 0.0
        logits[window, token, 1] += end or 0.0
    (answer,) = best_spans(logits, windows, long_example, max_answer_length=30)
    assert answer.score == pytest.approx(expected)
    assert answer.answer == LONG_CONTEXT[answer.start : answer.end] and 0 <= answer.start < answer.end
    assert len(minilm(64).tokenizer.encode(answer.answer, add_special_tokens=False).ids) <= 30
    (unlimited,) = best_spans(logits, windows, long_example, max_answer_length=64)
    if trap == "longer than max_answer_length":
        assert unlimited.score == pytest.approx(30.0)
        assert (unlimited.start, unlimited.end) == (windows.offsets[0][first[0], 0], windows.offsets[0][first[40], 1])


def test_without_a_valid_span_the_answer_is_empty(long_example):
    windows = make_windows(minilm(64), long_example, doc_stride=16)
    logits = np.zeros((len(windows), 64, 2))
    logits[:, :, 1] = -np.inf
    (answer,) = best_spans(logits, windows, long_example)
    assert (answer.answer, answer.start, answer.end, answer.score) == ("", 0, 0, 0.0)


def brute_force(logits: np.ndarray, windows, examples: QAExamples, max_answer_length: int) -> list[tuple]:
    """(score, char start, char end) of the best valid span per question, trying every pair."""
    best = [(-np.inf, 0, 0)] * len(examples)
    for w, i in enumerate(windows.example_index):
        inside = context_tokens(windows, w)
        for s in inside:
            for e in inside[(inside >= s) & (inside < s + max_answer_length)]:
                score = float(logits[w, s, 0] + logits[w, e, 1])
                if score > best[i][0]:
                    best[i] = (score, int(windows.offsets[w][s, 0]), int(windows.offsets[w][e, 1]))
    return best


def test_decoding_finds_the_best_valid_span_a_brute_force_search_finds(dev):
    examples = dev.subset(range(0, 400, 10))
    windows = make_windows(minilm(64), examples, doc_stride=16)
    logits = np.random.default_rng(0).normal(size=(len(windows), 64, 2))
    predictions = best_spans(logits, windows, examples, n_best=64, max_answer_length=8)
    expected = brute_force(logits, windows, examples, max_answer_length=8)
    assert len(windows) > 2 * len(examples)
    for p, (score, start, end), context in zip(predictions, expected, examples.contexts):
        assert p.score == pytest.approx(score)
        assert context[start:end].strip() == p.answer == context[p.start : p.end]
    nulls = np.full(len(examples), np.inf)
    np.minimum.at(nulls, windows.example_index, logits[:, 0, 0] + logits[:, 0, 1])
    assert [p.null_score for p in predictions] == pytest.approx(nulls.tolist())


def test_the_null_threshold_answers_nothing_when_cls_wins(long_example):
    windows = make_windows(minilm(64), long_example, doc_stride=16)
    s, e = windows.positions[1]
    logits = np.zeros((len(windows), 64, 2))
    logits[1, s, 0] = logits[1, e, 1] = 2.0
    logits[:, 0, :] = 3.0
    (v1,) = best_spans(logits, windows, long_example)
    (strict,) = best_spans(logits, windows, long_example, null_threshold=1.5)
    (lenient,) = best_spans(logits, windows, long_example, null_threshold=2.0)
    assert v1.answer == lenient.answer == ANSWER and (v1.score, v1.null_score) == (4.0, 6.0)
    assert (strict.answer, strict.start, strict.end, strict.score) == ("", 0, 0, 6.0)


def on_token_boundaries(tokenizer, examples: QAExamples) -> list[bool]:
    """Per question, whether its first gold answer starts and ends where context tokens do
    (whitespace aside). SQuAD dev has answers inside a word ("gold" in "golden", "8" in "18"):
    no span of tokens, so not even a perfect model, can give exactly them."""
    unique = list(dict.fromkeys(examples.contexts))
    encodings = plain(tokenizer).encode_batch(unique, add_special_tokens=False)
    spans = {context: [stripped(context, a, b) for a, b in e.offsets] for context, e in zip(unique, encodings)}
    starts = {context: {a for a, _ in pairs} for context, pairs in spans.items()}
    ends = {context: {b for _, b in pairs} for context, pairs in spans.items()}
    return [answers[0][1] in starts[context] and answers[0][1] + len(answers[0][0]) in ends[context]
            for context, answers in zip(examples.contexts, examples.answers)]


def test_gold_positions_decode_back_to_the_gold_answers_on_squad_dev(dev):
    """The whole offset mapping: logits at each window's gold positions decode to the first gold
    answer's exact text wherever tokens can express it."""
    encoder = minilm(384)
    windows = make_windows(encoder, dev, doc_stride=128)
    predictions = best_spans(gold_logits(windows), windows, dev)
    assert squad_scores([p.answer for p in predictions], dev.answer_texts())["f1"] >= 0.99
    aligned = on_token_boundaries(encoder.tokenizer, dev)
    assert sum(aligned) >= 0.99 * len(dev)
    for p, answers, context, ok in zip(predictions, dev.answers, dev.contexts, aligned):
        assert p.answer == context[p.start : p.end]
        if ok:
            assert (p.answer, p.start) == answers[0]
    examples, aligned = dev.subset(range(300)), aligned[:300]
    small = make_windows(minilm(64), examples, doc_stride=16)
    assert len(small) > 3 * len(examples) and (small.positions[:, 0] == 0).any()
    predictions = best_spans(gold_logits(small), small, examples)
    assert [p.answer for p, ok in zip(predictions, aligned) if ok] == \
        [answers[0][0] for answers, ok in zip(examples.answers, aligned) if ok]


@pytest.mark.parametrize("trim_offsets", [True, False], ids=["roberta-trimmed", "gpt2-untrimmed"])
def test_byte_level_bpe_spans_are_exact_substrings_of_the_context(dev, trim_offsets):
    """Byte-level tokens carry the space before a word; untrimmed, their offsets include it, and
    decoding still returns the answer without it."""
    examples = dev.subset(range(300))
    tokenizer = byte_level_bpe(dev.contexts[::20] + dev.questions[::4], trim_offsets)
    windows = make_windows(TextEncoder(tokenizer, 128), examples, doc_stride=32)
    gold_starts = [(examples.contexts[i], offsets[s, 0])
                   for i, offsets, (s, _) in zip(windows.example_index, windows.offsets, windows.positions) if s]
    assert any(context[start].isspace() for context, start in gold_starts) != trim_offsets
    predictions = best_spans(gold_logits(windows), windows, examples, max_answer_length=100)
    aligned = on_token_boundaries(tokenizer, examples)
    assert sum(aligned) >= 0.98 * len(examples)
    for p, answers, context, ok in zip(predictions, examples.answers, examples.contexts, aligned):
        assert p.answer == context[p.start : p.end] == p.answer.strip() and p.answer
        if ok:
            assert (p.answer, p.start) == answers[0]


def test_qa_imports_no_training_package(tmp_path):
    env = env_without_training_packages(tmp_path / "site")
    code = "import sys, tfsft.tasks.qa; print(sorted(m for m in ('tensorflow', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_qa_bench_reports_both_training_pipelines_at_a_tiny_size(tiny_checkpoint, tmp_path):
    """bench/qa.py end to end on the tiny BERT: part 1's table (no timing asserted), part 2 skipped without a bundle."""
    root = Path(__file__).resolve().parents[1]
    output = tmp_path / "qa.md"
    command = [
        sys.executable, str(root / "bench" / "qa.py"), "--model_name_or_path", str(tiny_checkpoint),
        "--train_file", str(shared_path("squad-v1.1", "train-v1.1.json")),
        "--dev_file", str(shared_path("squad-v1.1", "dev-v1.1.json")), "--train_samples", "24",
        "--eval_samples", "8", "--batch_size", "8", "--max_seq_length", "64", "--doc_stride", "16",
        "--output", str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text(encoding="utf-8")
    assert report in result.stdout and "`python bench/qa.py --model_name_or_path" in report
    rows = {line.split(" | ")[0]: line.split(" | ") for line in report.splitlines() if line.startswith("| (")}
    assert sorted(rows) == ["| (a) pad every window to 64, random batches", "| (b) tfsft LengthBatchedData"]
    padding = {name[3]: float(row[6].rstrip("%")) for name, row in rows.items()}
    assert padding["a"] > padding["b"]
    for row in rows.values():
        assert 0.0 <= float(row[8]) <= 1.0  # dev F1 after training
    assert "(b)/(a) training throughput:" in report
    assert "Skipped: no --bundle given" in report
