"""Generation speed of the exported decoder (issue 18): tokens/s of onnxruntime with the key/value
cache, against the same graph recomputing the whole sequence every step, and against Keras' own
greedy `generate`, in one run.

Modes (greedy, no eos: every row makes exactly `--new_tokens` tokens):

- `onnx_cache`: `tfsft.generation.generate` (left-padded batch, one prefill, then one token per
  step through the cache);
- `onnx_int8_cache`: the same over the int8 decoder (`tfsft.export_decoder.quantize_decoder`:
  8-bit MatMulNBits, weights and activations in blocks of 32);
- `onnx_int8_dynamic_cache`: the same over the encoders' dynamic int8 (`method="dynamic"`: one
  activation scale per tensor);
- `onnx_recompute`: the same fp32 graph fed the whole sequence with an empty past every step
  (`generate(..., use_cache=False)`);
- `keras_generate`: transformers' TF `generate(do_sample=False)` on the same left-padded batch
  (eager, with transformers' own cache).

The model is a random Mistral (`--model tiny`: 8 layers, hidden 512, 8 heads, 4 KV heads, vocabulary
8,192) or the embedded SmolLM2-135M (`--model smollm2`, converted by `tfsft.checkpoint` on first
use). Before timing, the decoder passes the export's parity gate on the bench prompts (prefill and
cached logits, greedy ids equal to Keras'), and every mode's tokens are compared with
`onnx_cache`'s. Batches: `--batch_sizes` (default 1 and 8) prompts, left-padded: for the random
model, seeded random token ids `--prompt_tokens` long (a batch spreads them from half that to all
of it); for SmolLM2, SST-2 dev sentences (../shared/data) cut to `--prompt_tokens` tokens, so that
the int8 decoders' parity is measured on text.
Each (mode, batch) cell runs `--repeats` times, the modes interleaved in every round so they
share the machine's load alike; a cell's figure is its median. Ratios are of tokens/s, within
this run. Then `--train_steps` causal-LM training steps are timed (tokens/s, tfsft's
AdamW and completion-only loss, `--train_batch` x `--train_length` random tokens). Results go to OUTPUT/results.json (`--output`, else the temporary directory the decoders
were written to and removed from) and the table is printed.

    python bench/generate.py [--model tiny|smollm2] [--new_tokens 128] [--batch_sizes 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = ("onnx_cache", "onnx_int8_cache", "onnx_int8_dynamic_cache", "onnx_recompute", "keras_generate")
TINY = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=1024, sliding_window=None)


def build_model(name: str):
    """The Keras causal LM to export and to time against, and its tokenizer (None for the random one)."""
    import transformers

    from tfsft.modeling import tf  # noqa: F401  (TensorFlow set up as tfsft does)

    if name == "tiny":
        model = transformers.TFMistralForCausalLM(transformers.MistralConfig(**TINY))
        model(model.dummy_inputs, training=False)
        rng = np.random.default_rng(0)
        for weight in model.weights:
            weight.assign(rng.normal(0.0, 0.1, weight.shape).astype(np.float32))
        return model, None
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    from tfsft.checkpoint import resolve_checkpoint
    from tfsft.config import EMBEDDED_SMOLLM2

    directory = resolve_checkpoint(EMBEDDED_SMOLLM2)
    config = transformers.MistralConfig.from_json_file(str(directory / "config.json"))
    model = transformers.TFMistralForCausalLM(config)
    model(model.dummy_inputs, training=False)
    model = load_pytorch_state_dict_in_tf2_model(model, load_file(str(directory / "model.safetensors")),
                                                 allow_missing_keys=True)
    return model, Tokenizer.from_file(str(directory / "tokenizer.json"))


def bench_prompts(batch: int, length: int, vocab: int, seed: int, tokenizer=None) -> list[list[int]]:
    """`batch` prompts: SST-2 dev sentences from `seed` on if there is a tokenizer, else seeded random
    ids (a batch of several spreads their lengths over [length/2, length])."""
    if tokenizer is not None:
        lines = (ROOT.parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
        sentences = [line.split("\t")[0].strip() for line in lines[1:]][seed:seed + batch]
        return [tokenizer.encode(sentence).ids[:length] for sentence in sentences]
    rng = np.random.default_rng(seed)
    lengths = [length] if batch == 1 else np.linspace(max(1, length // 2), length, batch).round().astype(int)
    return [rng.integers(3, vocab, int(n)).tolist() for n in lengths]


def timed(run: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--parity_prompts", type=int, default=8)
    parser.add_argument("--output", default=None)
    parser.add_argument("--train_steps", type=int, default=4,
                        help="then time this many causal-LM training steps (tfsft's AdamW and completion loss; 0: none)")
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--train_length", type=int, default=256)
    args = parser.parse_args(argv)

    from tfsft.export_decoder import check_decoder_parity, convert_decoder, keras_greedy, keras_reference, quantize_decoder
    from tfsft.generation import DecoderSession, generate

    modes = [m for m in args.modes.split(",") if m]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tfsft-bench-generate-"))
    output = Path(args.output) if args.output else work
    model, tokenizer = build_model(args.model)
    vocab = model.config.vocab_size
    start = time.perf_counter()
    convert_decoder(model, work / "decoder.onnx")
    quantize_decoder(work / "decoder.onnx", work / "decoder.int8.onnx")
    quantize_decoder(work / "decoder.onnx", work / "decoder.int8_dynamic.onnx", method="dynamic")
    export_s = time.perf_counter() - start
    gate_prompts = bench_prompts(args.parity_prompts, args.prompt_tokens, vocab, seed=99, tokenizer=tokenizer)
    reference = keras_reference(model, gate_prompts, max_new_tokens=16)
    files = {"fp32": "decoder", "int8": "decoder.int8", "int8_dynamic": "decoder.int8_dynamic"}
    parity = {kind: check_decoder_parity(work / f"{name}.onnx", reference).as_dict() for kind, name in files.items()}
    print(f"export and int8 {export_s:.1f}s", flush=True)
    for kind, report in parity.items():
        print(f"parity {kind}: {report}", flush=True)
    sessions = {kind: DecoderSession(work / f"{name}.onnx") for kind, name in files.items()}

    def runner(mode: str, prompts: list[list[int]], new_tokens: int) -> Callable[[], list[list[int]]]:
        if mode == "keras_generate":
            return lambda: keras_greedy(model, prompts, new_tokens, None, 0)
        session = sessions["int8_dynamic" if "dynamic" in mode else "int8" if "int8" in mode else "fp32"]
        use_cache = mode != "onnx_recompute"
        return lambda: [r.tokens for r in generate(session, prompts, max_new_tokens=new_tokens, use_cache=use_cache)]

    results: dict = {"model": args.model, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                     "export_s": export_s, "parity": parity, "cells": {}}
    for batch in batches:
        prompts = bench_prompts(batch, args.prompt_tokens, vocab, seed=batch, tokenizer=tokenizer)
        for mode in modes:  # warm-up: first-call costs (tracing, allocations) out of the timings
            runner(mode, prompts, 2)()
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        tokens: dict[str, list[list[int]]] = {}
        for round_ in range(args.repeats):
            for mode in modes[round_ % len(modes):] + modes[: round_ % len(modes)]:
                elapsed, tokens[mode] = timed(runner(mode, prompts, args.new_tokens))
                seconds[mode].append(elapsed)
        for mode in modes:
            median = statistics.median(seconds[mode])
            results["cells"][f"{mode}@{batch}"] = {
                "mode": mode, "batch": batch, "seconds": seconds[mode], "tokens_per_s": batch * args.new_tokens / median,
                "same_tokens_as_onnx_cache": tokens[mode] == tokens.get("onnx_cache", tokens[mode]),
            }
    print(table(results, modes, batches))
    if args.train_steps:
        results["training"] = training_speed(model, args.train_batch, args.train_length, args.train_steps)
        print(f"training: {results['training']['tokens_per_s']:.1f} tokens/s "
              f"(batch {args.train_batch} x {args.train_length} tokens, {args.train_steps} steps)", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for name in files.values():
        (work / f"{name}.onnx").unlink()
    return results


def training_speed(model, batch: int, length: int, steps: int) -> dict:
    """Causal-LM training tokens/s: tfsft's compile (AdamW, the completion-only loss) on random
    sequences, every position labelled; one untimed step first (tracing). Changes the model."""
    from tfsft.config import TrainConfig
    from tfsft.tasks import IGNORED_LABEL
    from tfsft.training import compile_model

    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=(batch, length)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((batch, 1), IGNORED_LABEL, np.int32)], axis=1)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    compile_model(model, TrainConfig(learning_rate=1e-5), steps + 1, "causal_lm", steps_per_epoch=steps + 1)
    model.train_on_batch(features, labels)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(features, labels)
    seconds = time.perf_counter() - start
    return {"batch": batch, "length": length, "steps": steps, "seconds": seconds, "tokens_per_s": batch * length * steps / seconds}


def table(results: dict, modes: list[str], batches: list[int]) -> str:
    cells = results["cells"]
    lines = [
        f"model {results['model']}, {results['new_tokens']} new tokens, prompts up to {results['prompt_tokens']} tokens",
        "| mode | batch | tokens/s | x recompute | x keras | same tokens as onnx_cache |",
        "|---|---|---|---|---|---|",
    ]
    for batch in batches:
        for mode in modes:
            cell = cells[f"{mode}@{batch}"]
            ratios = [
                f"{cell['tokens_per_s'] / cells[f'{base}@{batch}']['tokens_per_s']:.1f}" if f"{base}@{batch}" in cells
                else "-" for base in ("onnx_recompute", "keras_generate")
            ]
            lines.append(f"| {mode} | {batch} | {cell['tokens_per_s']:.1f} | {ratios[0]} | {ratios[1]} | "
                         f"{'yes' if cell['same_tokens_as_onnx_cache'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
