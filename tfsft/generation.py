"""Text generation over an ONNX decoder with a key/value cache: numpy and onnxruntime, no TensorFlow.

The decoder graph (made by `tfsft.export_decoder`) takes `input_ids [batch, new]`, `attention_mask
[batch, past + new]`, `position_ids [batch, new]` and `past.{i}.key/value [batch, kv_heads, past,
head_dim]`, and returns `logits [batch, new, vocab]` and `present.{i}.key/value` (past + new long).
One graph serves the prefill (a past 0 positions long) and every decode step.

`generate` left-pads a batch of prompts, prefills once, then feeds one token per row per step
through the cache; `generate_steps` is the same loop yielding each step's new tokens (what a
streamed response sends as they come). Rows stop on their own (eos, a stop token sequence, or
the token budget) and leave the batch, so a long row never makes the finished ones compute.
Positions count from each row's first real token, as transformers numbers them, so a row's
tokens do not depend on the other prompts it is batched with (beyond float rounding).

An encoder-decoder (seq2seq: T5, Marian, BART; made by `tfsft.export_seq2seq`) is two graphs run by
`Seq2SeqSession`: the encoder reads each source once and also returns every decoder layer's
cross-attention keys and values (`cross.{i}.key/value`), which each decoder step takes as they are;
the decoder feeds one token per row per step through its self-attention cache
(`past.{i}.self_key/self_value` in, `present.{i}.self_key/self_value` out). `generate_seq2seq` and
`generate_seq2seq_steps` are `generate` and `generate_steps` for it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from tfsft.errors import ArtifactError, ConfigError, DataError
from tfsft.inference import open_session

DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS_OUTPUT = "logits"
METADATA_MODEL_TYPE = "tfsft.decoder.model_type"
METADATA_MAX_POSITIONS = "tfsft.decoder.max_positions"
"""ONNX metadata keys: the architecture, and how many positions its position table covers."""

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32}

TokenIds = Union[int, Sequence[int], None]


def past_names(num_layers: int) -> list[str]:
    return [f"past.{i}.{half}" for i in range(num_layers) for half in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{half}" for i in range(num_layers) for half in ("key", "value")]


def _require(what: str, path: Path, found: list[str], expected: list[str], kind: str, made_by: str) -> None:
    """ArtifactError when a graph lacks some of the `expected` input or output names."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise ArtifactError(
            f"{what} {path} lacks {kind} {missing[:4]}: expected {', '.join(expected[:5])}, ... "
            f"(made by {made_by}). Received: {kind}={sorted(found)}"
        )


def _run(session, path: Path, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`session.run`, onnxruntime's own exception types reported in one line naming the file."""
    try:
        return session.run(outputs, feeds)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArtifactError(f"{path}: inference failed ({message})") from None


class DecoderSession:
    """An onnxruntime session over a decoder graph, with the cache layout read from the graph.

    Args:
        path: the ONNX decoder.
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
        spinning: let idle onnxruntime threads busy-wait between runs (faster steps, busier cores).

    Raises:
        ArtifactError: the file is missing or unreadable, or lacks the decoder's inputs or outputs.
    """

    def __init__(self, path: str | os.PathLike, *, num_threads: Optional[int] = None, spinning: bool = False) -> None:
        self.path = Path(path)
        self.session = open_session(self.path, num_threads, spinning)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past.") and name.endswith(".key"))
        _require("ONNX decoder", self.path, list(inputs), [*DECODER_INPUTS, *past_names(self.num_layers)], "inputs",
                 "tfsft.export_decoder")
        _require("ONNX decoder", self.path, list(outputs), [LOGITS_OUTPUT, *present_names(self.num_layers)], "outputs",
                 "tfsft.export_decoder")
        if self.num_layers == 0:
            raise ArtifactError(
                f"ONNX decoder {self.path} has no cache inputs: expected past.{{i}}.key/value for each layer. "
                f"Received: inputs={sorted(inputs)}"
            )
        cache = inputs["past.0.key"]
        if len(cache.shape) != 4 or not all(isinstance(d, int) for d in cache.shape[1::2]):
            raise ArtifactError(
                f"ONNX decoder {self.path} has a cache input without fixed heads and head size: expected "
                f"[batch, kv_heads, past, head_dim]. Received: past.0.key shape={cache.shape}"
            )
        if cache.type not in _ORT_DTYPES or inputs["input_ids"].type not in _ORT_DTYPES:
            raise ArtifactError(
                f"ONNX decoder {self.path} has inputs of a type it cannot feed: expected float or float16 caches "
                f"and int64 or int32 ids. Received: past.0.key {cache.type}, input_ids {inputs['input_ids'].type}"
            )
        self.num_kv_heads, self.head_dim = cache.shape[1], cache.shape[3]
        self.cache_dtype = _ORT_DTYPES[cache.type]
        self.ids_dtype = _ORT_DTYPES[inputs["input_ids"].type]
        self._outputs = [LOGITS_OUTPUT, *present_names(self.num_layers)]
        self._past = past_names(self.num_layers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.model_type = metadata.get(METADATA_MODEL_TYPE)
        self.max_positions = int(metadata[METADATA_MAX_POSITIONS]) if METADATA_MAX_POSITIONS in metadata else None
        vocab = next(o for o in self.session.get_outputs() if o.name == LOGITS_OUTPUT).shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A cache 0 positions long: what a prefill passes."""
        return [np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self.cache_dtype) for _ in self._past]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: logits `[batch, new, vocab]` and the cache grown by the new positions."""
        feeds = {
            "input_ids": np.asarray(input_ids, self.ids_dtype),
            "attention_mask": np.asarray(attention_mask, self.ids_dtype),
            "position_ids": np.asarray(position_ids, self.ids_dtype),
            **dict(zip(self._past, past)),
        }
        logits, *present = _run(self.session, self.path, self._outputs, feeds)
        return logits, present


@dataclass(frozen=True)
class Generated:
    """The new tokens of one prompt, without the eos token or the stop sequence that ended them."""

    tokens: list[int]
    finish_reason: str
    """`eos`, `stop` (a stop token sequence) or `length` (max_new_tokens reached)."""


StopCheck = Callable[[int, list[int]], bool]
"""(row, its tokens so far) -> whether the row ends here (finish reason `stop`): e.g. a stop string
found in the decoded text, which the caller decodes."""


@dataclass(frozen=True)
class Step:
    """What one generation step did to one row."""

    row: int
    """The row's index in the prompts."""
    token: Optional[int]
    """The token added; None when the row ended on eos (never added) or asked for no tokens."""
    tokens: list[int]
    """The row's tokens so far, a stop token sequence that ended it trimmed: the live list, which
    later steps extend (copy it to keep it)."""
    finish_reason: Optional[str]
    """None while the row goes on; else `eos`, `stop` or `length`, in the row's last step."""


def generate(
    session: DecoderSession,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: TokenIds = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_token_sequences: Sequence[Sequence[int]] = (),
    use_cache: bool = True,
) -> list[Generated]:
    """Continue each prompt (token ids), batched with left padding.

    Args:
        session: the decoder.
        prompts: one list of token ids per prompt, none empty.
        max_new_tokens: the most tokens to add to each prompt.
        eos_token_id: the token (or tokens) that end a row; not included in its result.
        pad_token_id: the id left padding and finished rows carry (masked out: any valid id works).
        temperature: 0 picks the most likely token (greedy); above 0, sampling from the softmax of
            logits / temperature.
        top_p: sampling keeps the most likely tokens whose probabilities add up to top_p (nucleus).
        seed: seeds the sampler; the same seed, prompts and model give the same tokens.
        stop_token_sequences: token sequences that end a row, trimmed from its result.
        use_cache: False recomputes the whole sequence every step (a baseline for benchmarks).

    Returns:
        One `Generated` per prompt, in order.

    Raises:
        ConfigError: a bad argument, or prompt + new tokens beyond the model's positions.
        DataError: an empty prompt, or a token id outside the vocabulary.
    """
    return _collected(generate_steps(session, prompts, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p,
                                     seed, stop_token_sequences, use_cache), len(prompts))


def _collected(steps: Iterator[list[Step]], rows: int) -> list[Generated]:
    """Each row's `Generated`, from its finishing step."""
    results: list[Optional[Generated]] = [None] * rows
    for events in steps:
        for step in events:
            if step.finish_reason is not None:
                results[step.row] = Generated(list(step.tokens), step.finish_reason)
    return [result for result in results if result is not None]


def generate_steps(
    session: DecoderSession,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: TokenIds = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_token_sequences: Sequence[Sequence[int]] = (),
    use_cache: bool = True,
    stop_check: Optional[StopCheck] = None,
) -> Iterator[list[Step]]:
    """`generate`, one step at a time: yields, per step, a `Step` for each row still going, the
    step that ends a row carrying its finish reason; each row gets exactly one finishing step.

    The arguments are `generate`'s, checked here, before the first step (errors do not wait for
    iteration). `stop_check` ends a row (reason `stop`) after any token it returns True for.
    Each step is yielded before the next forward pass, so a consumer sees a token as soon as it
    is chosen.
    """
    check_settings(max_new_tokens, temperature, top_p, pad_token_id)
    _check_prompts(session, prompts, max_new_tokens)
    eos = _token_set(eos_token_id, "eos_token_id")
    loop = _StepLoop(session, eos, _stop_sequences(stop_token_sequences), stop_check, use_cache)
    return loop.steps(prompts, max_new_tokens, pad_token_id, temperature, top_p, np.random.default_rng(seed))


def _stop_sequences(stop_token_sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    stops = [list(s) for s in stop_token_sequences]
    if any(len(s) == 0 for s in stops):
        raise ConfigError("stop_token_sequences holds an empty sequence: expected at least one token in each. "
                          f"Received: stop_token_sequences={stops}")
    return stops


@dataclass
class _StepLoop:
    """The decoding loop of `generate_steps`, its arguments already checked."""

    session: DecoderSession
    eos: frozenset[int]
    stops: list[list[int]]
    stop_check: Optional[StopCheck]
    use_cache: bool

    def steps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int, temperature: float,
              top_p: float, rng: np.random.Generator) -> Iterator[list[Step]]:
        tokens: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            yield [Step(row, None, tokens[row], FINISH_LENGTH) for row in range(len(prompts))]
            return
        session = self.session
        ids, mask, positions = left_padded(prompts, pad_token_id)
        logits, past = session.run(ids, mask, positions, session.empty_past(len(prompts)))
        active = np.arange(len(prompts))
        for step in range(max_new_tokens):
            chosen = _choose(logits[:, -1, :], temperature, top_p, rng)
            events = [self._advance(int(row), tokens[row], int(chosen[k]), step == max_new_tokens - 1)
                      for k, row in enumerate(active)]
            yield events
            keep = [k for k, event in enumerate(events) if event.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(active):
                active, ids, mask, chosen = active[keep], ids[keep], mask[keep], chosen[keep]
                past = [p[keep] for p in past]
            position = mask.sum(axis=1, keepdims=True)
            ids = np.concatenate([ids, chosen[:, None].astype(ids.dtype)], axis=1)
            mask = np.concatenate([mask, np.ones_like(position)], axis=1)
            if self.use_cache:
                logits, past = session.run(chosen[:, None], mask, position, past)
            else:
                logits, _ = session.run(ids, mask, np.cumsum(mask, axis=1) - mask, session.empty_past(len(ids)))

    def _advance(self, row: int, tokens: list[int], token: int, last: bool) -> Step:
        """Add the chosen token to a row, and say whether (and why) the row ends with it."""
        reason = _append(tokens, token, self.eos, self.stops)
        if reason is None and self.stop_check is not None and self.stop_check(row, tokens):
            reason = FINISH_STOP
        if reason is None and last:
            reason = FINISH_LENGTH
        return Step(row, None if reason == FINISH_EOS else token, tokens, reason)


def _append(tokens: list[int], token: int, eos: frozenset[int], stops: list[list[int]]) -> Optional[str]:
    """Add `token` to a row; the reason the row ends with it, if it does."""
    if token in eos:
        return FINISH_EOS
    tokens.append(token)
    for stop in stops:
        if len(tokens) >= len(stop) and tokens[-len(stop):] == stop:
            del tokens[-len(stop):]
            return FINISH_STOP
    return None


def _choose(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row: argmax at temperature 0, else a nucleus sample."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    ranked = np.where(np.cumsum(ranked, axis=-1) - ranked < top_p, ranked, 0.0)
    cumulative = np.cumsum(ranked / ranked.sum(axis=-1, keepdims=True), axis=-1)
    draws = rng.random(len(logits))[:, None]
    picked = np.minimum((cumulative < draws).sum(axis=-1), logits.shape[-1] - 1)
    return order[np.arange(len(logits)), picked]


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`input_ids`, `attention_mask`, `position_ids` of a left-padded batch, positions numbered as
    transformers' TF `prepare_inputs_for_generation` numbers them (exclusive cumsum of the mask:
    each row counts from its first real token; padding sits at position 0, masked out)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask, np.cumsum(mask, axis=1) - mask


def _token_set(value: TokenIds, name: str) -> frozenset[int]:
    if value is None:
        return frozenset()
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{name} must be a token id or a list of token ids. Received: {name}={value!r}")
    return frozenset(int(v) for v in values)


def check_settings(max_new_tokens: int, temperature: float, top_p: float, pad_token_id: int) -> None:
    """ConfigError naming the first bad setting: callers check before work they would waste."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0. Received: max_new_tokens={max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy). Received: temperature={temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1]. Received: top_p={top_p!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
        raise ConfigError(f"pad_token_id must be a token id >= 0. Received: pad_token_id={pad_token_id!r}")


def _check_token_lists(sequences: Sequence[Sequence[int]], vocab: Optional[int], noun: str) -> None:
    """DataError for no sequences, an empty one, or a token id outside [0, vocab), naming its index."""
    if len(sequences) == 0:
        raise DataError(f"no {noun}s to generate from: expected at least one. Received: {noun}s=[]")
    for index, sequence in enumerate(sequences):
        if len(sequence) == 0:
            raise DataError(f"{noun} {index} is empty: expected at least one token. Received: {noun} {index}=[]")
        ids = np.asarray(sequence)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or (vocab is not None and ids.max() >= vocab):
            raise DataError(
                f"{noun} {index} has a token id outside the vocabulary: expected integers in [0, {vocab}). "
                f"Received: {noun} {index}={list(sequence)[:8]}{'...' if len(sequence) > 8 else ''}"
            )


def _check_prompts(session: DecoderSession, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    _check_token_lists(prompts, session.vocab_size, "prompt")
    longest = max(len(p) for p in prompts)
    if session.max_positions is not None and longest + max_new_tokens - 1 > session.max_positions:
        raise ConfigError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens goes beyond the model's "
            f"{session.max_positions} positions: expected at most {session.max_positions - longest + 1} new tokens. "
            f"Received: max_new_tokens={max_new_tokens}"
        )


# -------------------------------------------------------------------------------- seq2seq

ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_STATES = "encoder_hidden_states"
SEQ2SEQ_DECODER_INPUTS = ("decoder_input_ids", "encoder_attention_mask")
METADATA_DECODER_START = "tfsft.decoder.decoder_start_token_id"
"""ONNX metadata key of a seq2seq decoder: the token every row's decoding starts from."""


def self_past_names(num_layers: int) -> list[str]:
    return [f"past.{i}.{half}" for i in range(num_layers) for half in ("self_key", "self_value")]


def self_present_names(num_layers: int) -> list[str]:
    return [f"present.{i}.{half}" for i in range(num_layers) for half in ("self_key", "self_value")]


def cross_names(num_layers: int) -> list[str]:
    """The cross-attention keys and values: outputs of the encoder graph, inputs of the decoder graph."""
    return [f"cross.{i}.{half}" for i in range(num_layers) for half in ("key", "value")]


class Seq2SeqSession:
    """onnxruntime sessions over a seq2seq model's encoder and decoder graphs, the layout read from them.

    Args:
        encoder_path: the encoder (`input_ids`, `attention_mask` -> `encoder_hidden_states` and
            `cross.{i}.key/value [batch, heads, source, head_dim]`).
        decoder_path: the decoder (`decoder_input_ids [batch, 1]`, `encoder_attention_mask`,
            `past.{i}.self_key/self_value`, `cross.{i}.key/value` -> `logits [batch, 1, vocab]`,
            `present.{i}.self_key/self_value`).
        num_threads, spinning: as for `DecoderSession`, for both sessions.

    Raises:
        ArtifactError: a file is missing or unreadable, or lacks the inputs or outputs above.
    """

    def __init__(self, encoder_path: str | os.PathLike, decoder_path: str | os.PathLike, *,
                 num_threads: Optional[int] = None, spinning: bool = False) -> None:
        self.encoder_path, self.path = Path(encoder_path), Path(decoder_path)
        self.encoder = open_session(self.encoder_path, num_threads, spinning)
        self.session = open_session(self.path, num_threads, spinning)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = sum(1 for name in inputs if name.startswith("past.") and name.endswith(".self_key"))
        if self.num_layers == 0:
            raise ArtifactError(
                f"ONNX seq2seq decoder {self.path} has no cache inputs: expected past.{{i}}.self_key/self_value for "
                f"each layer. Received: inputs={sorted(inputs)}"
            )
        self._past, self._cross = self_past_names(self.num_layers), cross_names(self.num_layers)
        self._outputs = [LOGITS_OUTPUT, *self_present_names(self.num_layers)]
        self._encoder_outputs = [ENCODER_STATES, *self._cross]
        made_by = "tfsft.export_seq2seq"
        _require("ONNX seq2seq decoder", self.path, list(inputs), [*SEQ2SEQ_DECODER_INPUTS, *self._past, *self._cross],
                 "inputs", made_by)
        _require("ONNX seq2seq decoder", self.path, [o.name for o in self.session.get_outputs()], self._outputs, "outputs",
                 made_by)
        encoder_inputs = {i.name: i for i in self.encoder.get_inputs()}
        _require("ONNX seq2seq encoder", self.encoder_path, list(encoder_inputs), list(ENCODER_INPUTS), "inputs", made_by)
        _require("ONNX seq2seq encoder", self.encoder_path, [o.name for o in self.encoder.get_outputs()],
                 self._encoder_outputs, "outputs", made_by)
        cache = inputs["past.0.self_key"]
        if len(cache.shape) != 4 or not all(isinstance(d, int) for d in cache.shape[1::2]):
            raise ArtifactError(
                f"ONNX seq2seq decoder {self.path} has a cache input without fixed heads and head size: expected "
                f"[batch, heads, past, head_dim]. Received: past.0.self_key shape={cache.shape}"
            )
        ids = (inputs["decoder_input_ids"], encoder_inputs["input_ids"])
        if cache.type not in _ORT_DTYPES or any(i.type not in _ORT_DTYPES for i in ids):
            raise ArtifactError(
                f"ONNX seq2seq model {self.path} has inputs of a type it cannot feed: expected float or float16 caches "
                f"and int64 or int32 ids. Received: past.0.self_key {cache.type}, ids {[i.type for i in ids]}"
            )
        self.num_heads, self.head_dim = cache.shape[1], cache.shape[3]
        self.cache_dtype = _ORT_DTYPES[cache.type]
        self.ids_dtype, self.source_dtype = (_ORT_DTYPES[i.type] for i in ids)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.model_type = metadata.get(METADATA_MODEL_TYPE)
        self.max_positions = int(metadata[METADATA_MAX_POSITIONS]) if METADATA_MAX_POSITIONS in metadata else None
        """The most source tokens, and decoder tokens, the position tables cover (None: T5's relative positions)."""
        start = metadata.get(METADATA_DECODER_START)
        self.decoder_start_token_id = int(start) if start is not None else None
        vocab = next(o for o in self.session.get_outputs() if o.name == LOGITS_OUTPUT).shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The encoder's states `[batch, source, d_model]` and every decoder layer's cross keys and values."""
        feeds = {"input_ids": np.asarray(input_ids, self.source_dtype),
                 "attention_mask": np.asarray(attention_mask, self.source_dtype)}
        states, *cross = _run(self.encoder, self.encoder_path, self._encoder_outputs, feeds)
        return states, cross

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A self-attention cache 0 positions long: what the first step passes."""
        return [np.zeros((batch, self.num_heads, 0, self.head_dim), self.cache_dtype) for _ in self._past]

    def decode(self, decoder_input_ids: np.ndarray, encoder_attention_mask: np.ndarray, past: Sequence[np.ndarray],
               cross: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step: logits `[batch, 1, vocab]` and the self-attention cache one position longer."""
        feeds = {
            "decoder_input_ids": np.asarray(decoder_input_ids, self.ids_dtype),
            "encoder_attention_mask": np.asarray(encoder_attention_mask, self.ids_dtype),
            **dict(zip(self._past, past)), **dict(zip(self._cross, cross)),
        }
        logits, *present = _run(self.session, self.path, self._outputs, feeds)
        return logits, present


def generate_seq2seq(
    session: Seq2SeqSession,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: TokenIds = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_token_sequences: Sequence[Sequence[int]] = (),
    suppress_token_ids: TokenIds = None,
    decoder_start_token_id: Optional[int] = None,
) -> list[Generated]:
    """The target of each source (token ids), batched: each source encoded once, then one token
    per row per step through the decoder's cache, rows leaving the batch as they end.

    Args:
        session: the encoder and decoder.
        sources: one list of token ids per source (special tokens included), none empty.
        max_new_tokens, eos_token_id, temperature, top_p, seed, stop_token_sequences: as for `generate`.
        pad_token_id: the id right padding of the sources carries (masked out: any valid id works).
        suppress_token_ids: tokens never chosen (their logits set to -inf), as transformers'
            single-token `bad_words_ids` (Marian's pad token) or `suppress_tokens` exclude them.
        decoder_start_token_id: the first decoder token (None: the decoder graph's metadata).

    Returns:
        One `Generated` per source, in order.

    Raises:
        ConfigError: a bad argument, or more source tokens or new tokens than the model's positions.
        DataError: an empty source, or a token id outside the vocabulary.
    """
    return _collected(generate_seq2seq_steps(
        session, sources, max_new_tokens, eos_token_id, pad_token_id, temperature, top_p, seed, stop_token_sequences,
        suppress_token_ids=suppress_token_ids, decoder_start_token_id=decoder_start_token_id,
    ), len(sources))


def generate_seq2seq_steps(
    session: Seq2SeqSession,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: TokenIds = None,
    pad_token_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop_token_sequences: Sequence[Sequence[int]] = (),
    stop_check: Optional[StopCheck] = None,
    suppress_token_ids: TokenIds = None,
    decoder_start_token_id: Optional[int] = None,
) -> Iterator[list[Step]]:
    """`generate_seq2seq`, one step at a time, as `generate_steps` is `generate`: the arguments are
    checked here, and each step is yielded before the next decoder pass."""
    check_settings(max_new_tokens, temperature, top_p, pad_token_id)
    _check_sources(session, sources, max_new_tokens)
    start = session.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ConfigError("decoder_start_token_id must be a token id >= 0 (the decoder graph records none). "
                          f"Received: decoder_start_token_id={start!r}")
    suppress = _token_set(suppress_token_ids, "suppress_token_ids")
    vocab = session.vocab_size
    outside = sorted(t for t in {int(start), *suppress} if t < 0 or (vocab is not None and t >= vocab))
    if outside:
        raise ConfigError(f"decoder_start_token_id and suppress_token_ids must be ids in [0, {vocab}). "
                          f"Received: {outside}")
    loop = _Seq2SeqLoop(session, _token_set(eos_token_id, "eos_token_id"), _stop_sequences(stop_token_sequences),
                        stop_check, True, int(start), np.asarray(sorted(suppress), dtype=np.int64))
    return loop.steps(sources, max_new_tokens, pad_token_id, temperature, top_p, np.random.default_rng(seed))


@dataclass
class _Seq2SeqLoop(_StepLoop):
    """The decoding loop of `generate_seq2seq_steps`: rows end as in `_StepLoop`."""

    start: int
    suppress: np.ndarray

    def steps(self, sources: Sequence[Sequence[int]], max_new_tokens: int, pad_token_id: int, temperature: float,
              top_p: float, rng: np.random.Generator) -> Iterator[list[Step]]:
        tokens: list[list[int]] = [[] for _ in sources]
        if max_new_tokens == 0:
            yield [Step(row, None, tokens[row], FINISH_LENGTH) for row in range(len(sources))]
            return
        session = self.session
        ids, mask = right_padded(sources, pad_token_id)
        _, cross = session.encode(ids, mask)
        past = session.empty_past(len(sources))
        chosen = np.full(len(sources), self.start, dtype=np.int64)
        active = np.arange(len(sources))
        for step in range(max_new_tokens):
            logits, past = session.decode(chosen[:, None], mask, past, cross)
            chosen = _choose(self._allowed(logits[:, -1, :]), temperature, top_p, rng)
            events = [self._advance(int(row), tokens[row], int(chosen[k]), step == max_new_tokens - 1)
                      for k, row in enumerate(active)]
            yield events
            keep = [k for k, event in enumerate(events) if event.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(active):
                active, mask, chosen = active[keep], mask[keep], chosen[keep]
                past, cross = [p[keep] for p in past], [c[keep] for c in cross]

    def _allowed(self, logits: np.ndarray) -> np.ndarray:
        """The logits with the suppressed tokens at -inf."""
        if not len(self.suppress):
            return logits
        logits = np.array(logits, dtype=np.float32)
        logits[:, self.suppress] = -np.inf
        return logits


def right_padded(sources: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`input_ids` and `attention_mask` of a right-padded batch of sources, as transformers' tokenizers
    pad an encoder's input (an encoder attends both ways, so padding on either side is masked out alike)."""
    width = max(len(s) for s in sources)
    ids = np.full((len(sources), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(sources), width), dtype=np.int64)
    for row, source in enumerate(sources):
        ids[row, : len(source)] = source
        mask[row, : len(source)] = 1
    return ids, mask


def _check_sources(session: Seq2SeqSession, sources: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    _check_token_lists(sources, session.vocab_size, "source")
    limit = session.max_positions
    for index, source in enumerate(sources):
        if limit is not None and len(source) > limit:
            raise DataError(f"source {index} has {len(source)} tokens: expected at most the model's {limit} positions")
    if limit is not None and max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens goes beyond the decoder's {limit} positions: expected at most {limit}. "
                          f"Received: max_new_tokens={max_new_tokens}")


def trim_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first occurrence of any stop string, and whether one occurred.
    Stop strings are matched on decoded text (a string may span tokens), by the caller that decodes."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
