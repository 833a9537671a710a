"""Generative SFT on SQuAD recast as instructions: the embedded SmolLM2 before and after fine-tuning.

Each question becomes a chat: the user message holds the context and the question, the
assistant's reply is the first gold answer. The base model and the fine-tuned run are scored the
same way: greedy generation over the ONNX decoder with its cache (fp32, and the run's int8), token
F1 and exact match (SQuAD normalisation, best over all gold answers) on the dev questions.

    python bench/sft_squad.py --train_questions 2000 --dev_questions 500 --output /tmp/sft-squad

Writes `results.json` (scores, wall times, training tokens/s) and the run directory under --output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad-v1.1"
INSTRUCTION = "Answer the question with a short span copied from the context."


def squad_chats(path: Path, count: int, seed: int) -> list[dict]:
    """`count` seeded questions of a SQuAD file as chat records (all gold answers kept for scoring)."""
    from tfsft.tasks.qa import read_qa_examples

    examples = read_qa_examples(str(path), "question", "context", "answers")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(examples), size=min(count, len(examples)), replace=False).tolist())
    rows = []
    for i in chosen:
        user = f"{INSTRUCTION}\nContext: {examples.contexts[i]}\nQuestion: {examples.questions[i]}"
        golds = [text for text, _ in examples.answers[i]]
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": golds[0]}],
                     "answers": golds})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def score_decoder(onnx_path: Path, tokenizer_dir: Path, rows: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """Greedy answers of the ONNX decoder at `onnx_path` to the chats' prompts, scored against all gold answers."""
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.generation import DecoderSession, generate
    from tfsft.tasks.qa import squad_scores

    encoder = text_encoder(load_tokenizer(tokenizer_dir), 4096)
    prompt_format = encoder.prompt_format
    prompts = [encoder.tokenizer.encode(prompt_format.prompt_text(row["messages"][:-1])).ids for row in rows]
    session = DecoderSession(onnx_path)
    start = time.perf_counter()
    answers = []
    order = np.argsort([len(p) for p in prompts], kind="stable")
    texts: dict[int, str] = {}
    for chunk in range(0, len(order), batch_size):
        indices = order[chunk:chunk + batch_size]
        outputs = generate(session, [prompts[i] for i in indices], max_new_tokens,
                           eos_token_id=list(prompt_format.eos_token_ids), pad_token_id=encoder.pad_id)
        for i, out in zip(indices, outputs):
            texts[int(i)] = encoder.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
    answers = [texts[i] for i in range(len(rows))]
    scores = squad_scores(answers, [row["answers"] for row in rows])
    return {"token_f1": scores["f1"], "exact_match": scores["exact_match"], "seconds": round(time.perf_counter() - start, 1),
            "samples": [{"answer": a, "gold": row["answers"]} for a, row in list(zip(answers, rows))[:10]]}


def base_decoder(checkpoint: Path, path: Path, prompts: list[list[int]], eos: int, pad: int) -> dict:
    """The checkpoint as loaded, exported through the same parity gate as a run."""
    from tfsft.data import LabelMap
    from tfsft.export_decoder import export_decoder
    from tfsft.modeling import build_classifier

    model, _ = build_classifier(checkpoint, LabelMap(()), "base", "causal_lm")
    return export_decoder(model, path, prompts, eos_token_id=eos, pad_token_id=pad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default="embedded-smollm2")
    parser.add_argument("--train_questions", type=int, default=2000)
    parser.add_argument("--dev_questions", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--output", required=True)
    parser.add_argument("--skip_base", action="store_true", help="do not score the model before fine-tuning")
    args = parser.parse_args(argv)

    from tfsft.checkpoint import load_tokenizer, resolve_checkpoint, text_encoder
    from tfsft.config import RunConfig
    from tfsft.pipeline import finetune

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    train = squad_chats(SQUAD / "train-v1.1.json", args.train_questions, 0)
    dev = squad_chats(SQUAD / "dev-v1.1.json", args.dev_questions, 1)
    train_file = write_jsonl(out / "train.jsonl", [{"messages": r["messages"]} for r in train])
    dev_file = write_jsonl(out / "dev.jsonl", [{"messages": r["messages"]} for r in dev[:64]])
    results: dict = {"train_questions": len(train), "dev_questions": len(dev), "settings": vars(args)}
    checkpoint = resolve_checkpoint(args.model_name_or_path)
    if not args.skip_base:
        encoder = text_encoder(load_tokenizer(checkpoint), 4096)
        fmt = encoder.prompt_format
        prompts = [encoder.tokenizer.encode(fmt.prompt_text(r["messages"][:-1])).ids[-96:] for r in dev[:4]]
        start = time.perf_counter()
        base_report = base_decoder(checkpoint, out / "base.onnx", prompts, fmt.eos_token_ids[0], encoder.pad_id)
        results["base_export_seconds"] = round(time.perf_counter() - start, 1)
        results["base_parity"] = base_report["fp32"]
        results["base"] = score_decoder(out / "base.onnx", checkpoint, dev, args.max_new_tokens, args.batch_size)
        print(json.dumps({"base": results["base"]["token_f1"]}), file=sys.stderr, flush=True)
    config = RunConfig.from_flat(dict(
        task="causal_lm", model_name_or_path=args.model_name_or_path, train_file=train_file, validation_file=dev_file,
        output_dir=str(out / "run"), overwrite_output_dir=True, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_seq_length=args.max_seq_length, max_generate_samples=16, max_new_tokens=args.max_new_tokens,
    ))
    start = time.perf_counter()
    run = finetune(config, verbose=2)
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    results["run_metrics"] = {k: v for k, v in run.metrics.items() if not isinstance(v, (list, dict))}
    bundle = run.run_dir / "onnx"
    results["fine_tuned"] = score_decoder(bundle / "model.onnx", run.run_dir / "model", dev, args.max_new_tokens, args.batch_size)
    if (bundle / "model.int8.onnx").is_file():
        results["fine_tuned_int8"] = score_decoder(
            bundle / "model.int8.onnx", run.run_dir / "model", dev, args.max_new_tokens, args.batch_size
        )
    if "base" in results:
        results["token_f1_gain_points"] = round(100 * (results["fine_tuned"]["token_f1"] - results["base"]["token_f1"]), 2)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("settings",)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
