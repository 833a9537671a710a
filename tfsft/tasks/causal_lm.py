"""Supervised fine-tuning of a decoder language model (the GPT family): prompt -> completion.

Examples are `prompt`/`completion` records, or chat `messages` whose last message is the
assistant's reply (rendered with the tokenizer's chat template). The model reads prompt and
completion as one sequence and the loss counts only the completion's tokens: each position's
label is the next token when that token belongs to the completion, else IGNORED_LABEL, as
TRL's SFTTrainer trains on completions only.

Without TensorFlow: reading, chat rendering, token layout and the generation scores (exact
match and token F1 with SQuAD's normalisation, ROUGE-L) live here, so the Predictor renders
prompts exactly as training did. The `CausalLanguageModeling` task at the end ties them to the
pipeline: the validation loss and perplexity, and greedy generations on validation prompts.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence, Union

import numpy as np

from tfsft.errors import ConfigError, DataError
from tfsft.tasks.base import IGNORED_LABEL, Task, invalid_setting
from tfsft.tasks.qa import exact_match, token_f1

if TYPE_CHECKING:
    from tfsft.config import DataConfig
    from tfsft.data import LabelMap

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]
"""A text prompt, or the chat messages before the reply (rendered with the chat template)."""
ROLES = ("system", "user", "assistant", "tool")
GENERATIONS_FILE = "generations.jsonl"


# ------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class CausalLMExamples:
    """Prompts with their reference completions (for chat: the assistant's last reply)."""

    prompts: list[Prompt]
    completions: list[str]
    rows: list[int]
    source: str = ""
    pairs: None = None
    """No sentence pairs (code shared with the text tasks checks that splits agree on pairs)."""
    columns: Optional[tuple[str, Optional[str], str]] = None
    labels: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> "CausalLMExamples":
        return CausalLMExamples(
            [self.prompts[i] for i in indices], [self.completions[i] for i in indices], [self.rows[i] for i in indices],
            self.source, None, self.columns,
        )

    @property
    def texts(self) -> list[str]:
        """Each prompt as text (a chat prompt: its messages' contents, for logs and length checks)."""
        return [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in self.prompts]

    @property
    def is_chat(self) -> bool:
        return any(not isinstance(p, str) for p in self.prompts)


def check_messages(value: Any, where: str) -> Messages:
    """A chat conversation: a non-empty list of {"role", "content"} objects with known roles."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string \"role\" and \"content\"")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {message['role']!r}; expected one of {list(ROLES)}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def example_from_record(record: dict[str, Any], where: str, data: "DataConfig") -> tuple[Prompt, str]:
    """(prompt, completion) of one record: prompt/completion columns, or chat messages ending with
    the assistant's reply."""
    messages = record.get(data.messages_column)
    if messages is not None:
        conversation = check_messages(messages, where)
        last = conversation[-1]
        if last["role"] != "assistant" or len(conversation) < 2:
            raise DataError(f"{where}: the last message must be the assistant's reply, after at least one other message")
        if not last["content"].strip():
            raise DataError(f"{where}: the assistant's reply is empty")
        return conversation[:-1], last["content"]
    prompt, completion = record.get(data.prompt_column), record.get(data.completion_column)
    for name, value in ((data.prompt_column, prompt), (data.completion_column, completion)):
        if value is None:
            raise DataError(
                f"{where}: no {name!r} field; a causal_lm record has {data.prompt_column!r} and "
                f"{data.completion_column!r}, or {data.messages_column!r}"
            )
        if not isinstance(value, str):
            raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    if not completion.strip():
        raise DataError(f"{where}: empty {data.completion_column!r}")
    return prompt, completion


def examples_from_records(records: Sequence[tuple[int, dict[str, Any]]], source: str, data: "DataConfig") -> CausalLMExamples:
    prompts, completions, rows = [], [], []
    for number, record in records:
        prompt, completion = example_from_record(record, f"{source}: row {number}", data)
        prompts.append(prompt)
        completions.append(completion)
        rows.append(number)
    if not prompts:
        raise DataError(f"{source}: no examples")
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes prompt/completion records and chat messages; use one layout per file")
    return CausalLMExamples(prompts, completions, rows, source)


def read_causal_lm_examples(path: str, data: "DataConfig") -> CausalLMExamples:
    """Prompt/completion (or chat) examples of a JSONL, CSV or TSV file."""
    from tfsft.data import read_records

    _, records = read_records(path, data.no_header)
    return examples_from_records(records, path, data)


# --------------------------------------------------------------------------------- prompt format


@dataclass(frozen=True)
class PromptFormat:
    """How prompts become tokens: the chat template and the special tokens of the tokenizer, saved
    in the bundle so the Predictor renders and stops as training did."""

    eos_token_ids: tuple[int, ...]
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    chat_template: Optional[str] = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptFormat":
        """From a transformers tokenizer (its eos, and the checkpoint's chat template, if any)."""
        eos = tokenizer.eos_token_id
        template = getattr(tokenizer, "chat_template", None)
        return cls(
            eos_token_ids=() if eos is None else (int(eos),), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
            chat_template=template if isinstance(template, str) else None,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PromptFormat":
        return cls(tuple(int(i) for i in values.get("eos_token_ids") or ()), values.get("bos_token"),
                   values.get("eos_token"), values.get("chat_template"))

    def to_dict(self) -> dict[str, Any]:
        return {"eos_token_ids": list(self.eos_token_ids), "bos_token": self.bos_token, "eos_token": self.eos_token,
                "chat_template": self.chat_template}

    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        """The chat template applied to `messages`, as transformers' `apply_chat_template` renders it."""
        if self.chat_template is None:
            raise DataError("the model's tokenizer has no chat template: give prompt/completion records, not messages")
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def prompt_text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.render(prompt, add_generation_prompt=True)

    def completion_text(self, prompt: Prompt, completion: str) -> str:
        """What follows the prompt in training: the completion, or for chat the rendered reply
        (the template's own end-of-turn tokens included, so the model learns to end its turn)."""
        return self.texts(prompt, completion)[1]

    def texts(self, prompt: Prompt, completion: str) -> tuple[str, str]:
        """(`prompt_text`, `completion_text`) of one example, a chat prompt rendered once."""
        head = self.prompt_text(prompt)
        if isinstance(prompt, str):
            return head, completion
        whole = self.render([*prompt, {"role": "assistant", "content": completion}], add_generation_prompt=False)
        if not whole.startswith(head):
            raise DataError("the chat template does not render a conversation as its prompt followed by the reply")
        return head, whole[len(head):]


_TEMPLATES: dict[str, Any] = {}


def _compiled_template(source: str):
    """A chat template compiled as transformers compiles it (sandboxed, trim_blocks, lstrip_blocks)."""
    if source not in _TEMPLATES:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        environment.globals["raise_exception"] = raise_exception
        _TEMPLATES[source] = environment.from_string(source)
    return _TEMPLATES[source]


def encode_example(tokenizer, prompt_ids: Sequence[int], completion_text: str, eos_token_ids: Sequence[int],
                   max_length: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(token ids, labels, truncated) of one example.

    `prompt_ids`: the prompt tokenized with the tokenizer's special tokens (a BOS where it adds
    one); the completion is tokenized without, and an eos follows unless it already holds one. Labels:
    position t carries token t+1 when that token is the completion's, else IGNORED_LABEL. A
    sequence over `max_length` loses the start of its prompt first (what is nearest the answer
    stays), then the end of its completion.
    """
    prompt = list(prompt_ids)
    completion = list(tokenizer.encode(completion_text, add_special_tokens=False).ids)
    if eos_token_ids and not set(completion) & set(eos_token_ids):
        completion.append(int(eos_token_ids[0]))
    truncated = len(prompt) + len(completion) > max_length
    if truncated:
        completion = completion[: max(max_length - 1, 1)]
        keep = max(max_length - len(completion), 1)
        prompt = prompt[-keep:] if prompt else prompt
    ids = np.asarray(prompt + completion, dtype=np.int32)[:max_length]
    labels = np.full(len(ids), IGNORED_LABEL, dtype=np.int32)
    start = len(prompt)
    labels[max(start - 1, 0): len(ids) - 1] = ids[max(start, 1):]
    return ids, labels, truncated


@dataclass(frozen=True)
class CompletionReference:
    """What evaluation scores a causal LM against: the examples, their token layout and prompt ids."""

    examples: CausalLMExamples
    prompt_ids: list[list[int]]
    """Each prompt's tokens, as generation continues them."""
    prompt_format: PromptFormat
    tokenizer: Any = None
    """The `tokenizers.Tokenizer` that decodes generated ids."""


def encode_examples(encoder: Any, examples: CausalLMExamples, prompt_format: PromptFormat):
    """(EncodedTexts, per-token labels as an object array, CompletionReference)."""
    from tfsft.tokenize import EncodedTexts

    tokenizer = encoder.tokenizer
    tokenizer.no_truncation()
    try:
        ids, labels, truncated, prompt_ids = [], [], [], []
        for where, prompt, completion in zip(examples.rows, examples.prompts, examples.completions):
            try:
                prompt_text, completion_text = prompt_format.texts(prompt, completion)
            except DataError as error:
                raise DataError(f"{examples.source}: row {where}: {error}") from None
            prompt_tokens = list(tokenizer.encode(prompt_text, add_special_tokens=True).ids)
            row_ids, row_labels, cut = encode_example(
                tokenizer, prompt_tokens, completion_text, prompt_format.eos_token_ids, encoder.max_length
            )
            ids.append(row_ids)
            labels.append(row_labels)
            truncated.append(cut)
            prompt_ids.append(prompt_tokens[-encoder.max_length:])
    finally:
        tokenizer.enable_truncation(encoder.max_length, strategy="longest_first")
    encoded = EncodedTexts(
        input_ids=ids, token_type_ids=[np.zeros_like(i) for i in ids], lengths=np.asarray([len(i) for i in ids], dtype=np.int64),
        truncated=np.asarray(truncated, dtype=bool),
    )
    packed = np.empty(len(labels), dtype=object)
    packed[:] = labels
    return encoded, packed, CompletionReference(examples, prompt_ids, prompt_format, tokenizer)


# -------------------------------------------------------------------------------------- metrics


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Words as rouge-score tokenizes them: lower case, runs of ASCII letters and digits."""
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words over the prediction's and the reference's lengths."""
    predicted, expected = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not expected:
        return 0.0
    previous = [0] * (len(expected) + 1)
    for word in predicted:
        current = [0]
        for j, other in enumerate(expected):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def generation_scores(generations: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Means over examples: exact match and token F1 (SQuAD normalisation), ROUGE-L."""
    if not generations:
        return {}
    return {
        "exact_match": float(np.mean([exact_match(g, r) for g, r in zip(generations, references)])),
        "token_f1": float(np.mean([token_f1(g, r) for g, r in zip(generations, references)])),
        "rougeL": float(np.mean([rouge_l(g, r) for g, r in zip(generations, references)])),
    }


def loss_metrics(nll_sum: float, tokens: int, prefix: str) -> dict[str, float]:
    loss = nll_sum / max(tokens, 1)
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 700.0)), f"{prefix}_tokens": int(tokens)}


# ----------------------------------------------------------------------------------------- task


class CausalLanguageModeling(Task):
    name = "causal_lm"
    summary = "supervised fine-tuning of a decoder LM (GPT family): prompt -> completion, loss on the completion"
    best_metrics = ("loss",)
    keras_metrics = frozenset({"loss"})
    default_max_seq_length = 512
    label_counts = (0, 0)
    sequence_head = False
    takes_pairs = False
    needs_train_file = True
    generates = True
    lora_trains_head = False

    reads_columns: ClassVar[str] = "--prompt_column/--completion_column or --messages_column"
    """What the task's records hold, for the error that refuses classification columns."""

    def check_data(self, data: "DataConfig") -> None:
        for name in ("text_pair_column", "label_column", "text_column"):
            if getattr(data, name) is not None:
                raise invalid_setting(
                    name, getattr(data, name), f"no value for --task {self.name} (it reads {self.reads_columns})",
                )

    def read(self, path: str, data: "DataConfig") -> CausalLMExamples:
        return read_causal_lm_examples(path, data)

    def hub_splits(self, data: "DataConfig") -> dict[str, Any]:
        """Each split of --dataset_name, with prompt/completion or messages columns."""
        from tfsft.data import _load_hub_dataset

        loaded = _load_hub_dataset(data)
        return {
            name: self.examples(list(enumerate((dict(row) for row in split), start=1)), f"{data.dataset_name}[{name}]", data)
            for name, split in loaded.items()
        }

    def examples(self, records: Sequence[tuple[int, dict[str, Any]]], source: str, data: "DataConfig") -> CausalLMExamples:
        """The examples of (row number, record) pairs, from a file or a Hub split."""
        return examples_from_records(records, source, data)

    def label_map(self, train: Any, delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap

        return LabelMap(())

    def encode_labels(self, label_map: "LabelMap", examples: Any, delimiter: str) -> np.ndarray:
        """Nothing per example: the per-token labels come from the tokens (`encode`)."""
        return np.zeros(len(examples), dtype=np.int64)

    def encode(self, encoder: Any, examples: Any, labels: np.ndarray, data: "DataConfig") -> tuple[Any, np.ndarray, Any]:
        prompt_format = getattr(encoder, "prompt_format", None)
        if prompt_format is None:
            raise ConfigError("a causal_lm encoder needs the tokenizer's prompt format (tfsft.checkpoint.text_encoder sets it)")
        return encode_examples(encoder, examples, prompt_format)

    def reference_subset(self, reference: CompletionReference, rows: np.ndarray) -> CompletionReference:
        return CompletionReference(
            reference.examples.subset(rows.tolist()), [reference.prompt_ids[i] for i in rows], reference.prompt_format,
            reference.tokenizer,
        )

    def describe(self, label_map: "LabelMap") -> str:
        return "prompt/completion examples"

    def head_class(self, pooling: str, model_type: str):
        from transformers import TFAutoModelForCausalLM

        return TFAutoModelForCausalLM

    def objective(self) -> tuple[Any, list]:
        from tfsft.tasks.ner import masked_token_loss

        return masked_token_loss, []

    def before_training(self, model: Any, data: Any, reference: Any) -> dict[str, float]:
        """The validation loss of the model as loaded, to compare with after training."""
        from tfsft.evaluation import token_nll

        nll, tokens = token_nll(model, data)
        return {"eval_loss_initial": nll / max(tokens, 1)}

    def score(self, model: Any, data: Any, reference: Any, label_map: "LabelMap", prefix: str,
              decision: dict[str, Any], settings: "DataConfig") -> tuple[dict[str, float], dict[str, Any]]:
        """Loss and perplexity over the reference tokens, and greedy generations of up to
        --max_generate_samples prompts scored against their references (`generation_scores`)."""
        from tfsft.evaluation import token_nll

        nll, tokens = token_nll(model, data)
        metrics = loss_metrics(nll, tokens, prefix)
        metrics[f"{prefix}_samples"] = len(reference.examples)
        count = min(len(reference.examples), settings.max_generate_samples)
        report: dict[str, Any] = {"tokens": tokens}
        if count:
            outputs = self.generate_ids(model, reference, count, settings.max_new_tokens, data)
            texts = [decode_generation(reference.tokenizer, ids) for ids in outputs]
            references = reference.examples.completions[:count]
            scores = self.generation_scores(texts, references)
            metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
            metrics[f"{prefix}_generated_samples"] = count
            report["generations"] = [
                {**self.sample_input(reference, i), "reference": r, "generation": g}
                for i, (r, g) in enumerate(zip(references, texts))
            ]
            report["max_new_tokens"] = settings.max_new_tokens
        return metrics, report

    def generate_ids(self, model: Any, reference: CompletionReference, count: int, max_new_tokens: int, data: Any):
        """Keras' greedy new tokens for the first `count` prompts of `reference`."""
        from tfsft.evaluation import keras_generate

        return keras_generate(model, reference.prompt_ids[:count], max_new_tokens, reference.prompt_format.eos_token_ids,
                              data.pad_id, batch_size=data.batch_size)

    def generation_scores(self, texts: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return generation_scores(texts, references)

    def sample_input(self, reference: CompletionReference, index: int) -> dict[str, str]:
        """What generations.jsonl shows as the input of sample `index`: the prompt as rendered."""
        return {"prompt": reference.prompt_format.prompt_text(reference.examples.prompts[index])}

    def metrics(self, reference, logits, label_map, prefix, decision):
        raise ConfigError(f"{self.name} scores a model (Task.score), not logits")

    def predict(self, predictor: Any, inputs: Sequence[Any]) -> list[Any]:
        return predictor.generate(inputs)

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        return ["generated"]

    def request_error(self, key: str) -> Optional[str]:
        return 'a causal_lm model generates text: POST /generate {"prompts": ["..."], "max_new_tokens": N}'

    def bundle_settings(self, data: "DataConfig") -> dict[str, Any]:
        return {"max_new_tokens": data.max_new_tokens}

    def trained_columns(self, saved: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
        return saved.get("prompt_column") or "prompt", None


def decode_generation(tokenizer, ids: Sequence[int]) -> str:
    """Generated tokens as text, special tokens dropped, outer whitespace stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


TASK = CausalLanguageModeling()
