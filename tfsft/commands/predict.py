"""Predict every line of a CSV, TSV or JSONL file (or stdin) with an ONNX bundle.

Predictions are written in input order as they are computed (JSONL objects with `label` and
`probabilities`, or CSV rows), so large files stream in bounded memory. The text (and pair) are
read from the columns the run trained on, as its config.json in the bundle records them, else
from `text`/`sentence`/... (and `text_pair`/`sentence2`/...); --text_column and
--text_pair_column choose others. A question-answering bundle reads `question` and `context` and
writes `answer`, `start`, `end` (character offsets into the context) and `score`. A bundle of a
model that generates text (--task causal_lm) reads a `prompt` field or column (or, in JSONL, chat
`messages`) and writes `generated` and `finish_reason` (CSV: a `generated` column), continuing
each prompt greedily by up to --max_new_tokens tokens. A multi-task bundle predicts with the head
--task names, reading and writing the fields a single-task bundle of that task would.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack

from tfsft.cli import ArgumentParser, positive_int

CHUNK = 1024
"""Inputs read, predicted and written at a time: large enough to sort by length, small enough to stream."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("bundle", help="An ONNX bundle directory (RUN_DIR/onnx).")
    parser.add_argument("--task", default=None,
                        help="A multi-task bundle: the task (head) to predict with, one of those its bundle.json names.")
    parser.add_argument("--input", required=True, help="CSV, TSV or JSONL file with a text column, or - for stdin.")
    parser.add_argument("--input_format", choices=("csv", "tsv", "jsonl"), help="Default: from the suffix (stdin: jsonl).")
    parser.add_argument(
        "--text_column", help="Field (JSONL) or column (CSV/TSV) of the text; default: the one the run trained on.")
    parser.add_argument(
        "--text_pair_column", help="Field or column of the second text of a pair; default: the one the run trained on.")
    parser.add_argument("--output", default="-", help="Where to write predictions (default: stdout).")
    parser.add_argument("--output_format", choices=("jsonl", "csv"), default="jsonl")
    parser.add_argument("--int8", action="store_const", const=True, default=None,
                        help="Use the int8-quantized model (default: the fp32 model, or int8 in a bundle that ships "
                             "only that).")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--num_threads", type=positive_int, default=None, help="onnxruntime intra-op threads.")
    parser.add_argument("--max_new_tokens", type=positive_int, default=None,
                        help="A model that generates text: the most tokens added to each prompt "
                             "(default: the bundle's).")
    return parser


def run(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from tfsft.errors import ConfigError
    from tfsft.inference import (
        InputFields,
        Predictor,
        chunked,
        csv_header,
        format_csv_row,
        input_format,
        read_inputs,
        read_prompts,
    )

    predictor = Predictor(args.bundle, int8=args.int8, batch_size=args.batch_size, num_threads=args.num_threads)
    try:
        predictor = predictor.for_task(args.task)
    except ConfigError as error:
        raise ConfigError(f"--task: {error}") from None
    if args.max_new_tokens is not None and not predictor.generates:
        raise ConfigError(f"--max_new_tokens applies to a model that generates text; this bundle's task is "
                          f"{predictor.bundle.task}. Received: max_new_tokens={args.max_new_tokens}")
    fields = InputFields.for_bundle(predictor.bundle, args.text_column, args.text_pair_column)
    fmt = args.input_format or input_format(args.input)
    with ExitStack() as stack:
        source = sys.stdin if args.input == "-" else stack.enter_context(open(args.input, encoding="utf-8-sig", newline=""))
        out = sys.stdout if args.output == "-" else stack.enter_context(open(args.output, "w", encoding="utf-8"))
        name = "<stdin>" if args.input == "-" else args.input
        progress = stack.enter_context(tqdm(unit=" texts", disable=args.input == "-", file=sys.stderr))
        if args.output_format == "csv":
            out.write(csv_header(predictor.labels, predictor.bundle.task))
        read = read_prompts if predictor.generates else read_inputs
        size = args.batch_size if predictor.generates else CHUNK  # generations are written as each batch ends
        for chunk in chunked(read(source, fmt, name, fields), size):
            for prediction in predictions(predictor, chunk, name, args.max_new_tokens):
                if args.output_format == "csv":
                    out.write(format_csv_row(prediction, predictor.labels))
                else:
                    out.write(json.dumps(prediction.to_dict(), ensure_ascii=False) + "\n")
            out.flush()
            progress.update(len(chunk))


def predictions(predictor, chunk: list, source: str, max_new_tokens: int | None) -> list:
    """The predictions of one chunk of (line number, input); a prompt the model cannot take is an
    error naming its line."""
    from tfsft.errors import DataError
    from tfsft.inference import PromptError

    inputs = [item for _, item in chunk]
    if not predictor.generates:
        return predictor.predict(inputs)
    try:
        return predictor.generate(inputs, max_new_tokens=max_new_tokens)
    except PromptError as error:
        raise DataError(f"{source}: line {chunk[error.index][0]}: the prompt {error.detail}") from None
