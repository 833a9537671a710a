"""Read a llama.cpp GGUF file with numpy and convert a Llama-architecture one to a transformers checkpoint.

The embedded generative model (`--model_name_or_path embedded-smollm2`) ships only as a quantised
GGUF file; `convert_llama_gguf` turns it once into a float32 `model.safetensors` with the Hugging
Face Llama tensor names, a `config.json` that `TFMistralForCausalLM` builds from (Mistral without a
sliding window computes Llama), and a byte-level BPE `tokenizer.json` rebuilt from the GGUF's
vocabulary, merges and pre-tokenizer. Neither TensorFlow nor transformers is needed here; the
`gguf` package is not either (it is used by the tests only, as a reference reader).

GGUF layout (version 2 and 3, little-endian): magic `GGUF`, version, tensor count, metadata count;
the metadata key/values; the tensor infos (name, dims innermost first, ggml type, offset); padding
to `general.alignment`; then the tensor data, each tensor at its offset from the data start.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np

from tfsft.artifacts import atomic_path, write_json, write_text
from tfsft.errors import ArtifactError

CONVERTER_VERSION = 1
"""Part of the cache key of converted checkpoints: bump it when the conversion's output changes."""
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALARS = {  # GGUF metadata value type -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_STRING, _ARRAY = 8, 9

GGML_TYPES = {  # ggml type id -> (name, elements per block, bytes per block)
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}
"""The tensor types this reader dequantises; a file with another type is refused by name."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    """numpy order (outermost first): GGUF lists dims innermost first, so this is them reversed."""
    ggml_type: int
    offset: int
    """Byte offset from the start of the data section."""

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type, (f"type {self.ggml_type}",))[0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


class GGUFFile:
    """A GGUF file opened read-only: `metadata`, `tensors` (infos by name), and `tensor(name)`,
    which dequantises one tensor to float32 from a memory map (the file is never read whole)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise ArtifactError(f"{self.path}: cannot open the GGUF file ({error})") from None
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as error:
            raise ArtifactError(f"{self.path}: not a readable GGUF file ({type(error).__name__}: {error})") from None

    def _parse(self) -> None:
        reader = _Reader(self._map)
        magic = reader.take(4)
        if magic != GGUF_MAGIC:
            raise ArtifactError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        self.version = reader.scalar("I")
        if self.version not in GGUF_VERSIONS:
            raise ArtifactError(
                f"{self.path}: unsupported GGUF version; expected one of {list(GGUF_VERSIONS)}. Received: version={self.version}"
            )
        tensor_count, metadata_count = reader.scalar("Q"), reader.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(metadata_count):
            key = reader.string()
            self.metadata[key] = reader.value(reader.scalar("I"))
        self.tensors: dict[str, TensorInfo] = {}
        for _ in range(tensor_count):
            name = reader.string()
            dims = [reader.scalar("Q") for _ in range(reader.scalar("I"))]
            ggml_type, offset = reader.scalar("I"), reader.scalar("Q")
            self.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        self.data_offset = -(-reader.position // self.alignment) * self.alignment

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a view into the memory map)."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise ArtifactError(
                f"{self.path}: tensor {name} has a ggml type this reader cannot dequantise; expected one of "
                f"{sorted(n for n, _, _ in GGML_TYPES.values())}. Received: ggml_type={info.ggml_type}"
            )
        start = self.data_offset + info.offset
        if start + info.nbytes > len(self._map):
            raise ArtifactError(f"{self.path}: tensor {name} runs past the end of the file (truncated download?)")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=start)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantised to a float32 array of `tensors[name].shape`."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.ggml_type, info.shape)


class _Reader:
    """Sequential little-endian reads over a buffer."""

    def __init__(self, buffer: Any):
        self.buffer, self.position = buffer, 0

    def take(self, size: int) -> bytes:
        if self.position + size > len(self.buffer):
            raise ValueError(f"read of {size} bytes at {self.position} runs past the end of the file")
        data = self.buffer[self.position : self.position + size]
        self.position += size
        return data

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        return self.take(self.scalar("Q")).decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALARS and item_type != 7:  # numeric arrays in one read (token scores, types)
                dtype = np.dtype("<" + _SCALARS[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of `raw` (the stored bytes of a tensor of `ggml_type`), as in ggml's
    `dequantize_row_*`: blocks run along the innermost dimension."""
    name, block, size = GGML_TYPES[ggml_type]
    count = int(np.prod(shape, dtype=np.int64))
    if count % block or raw.size != count // block * size:
        raise ArtifactError(
            f"a {name} tensor of shape {list(shape)} needs {count // block * size} bytes in blocks of {block}; "
            f"Received: {raw.size} bytes"
        )
    if name == "F32":
        values = raw.view("<f4")
    elif name == "F16":
        values = raw.view("<f2")
    elif name == "BF16":
        values = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        blocks = raw.reshape(-1, size)
        values = _BLOCK_DEQUANTIZERS[name](blocks)
    return np.array(values, dtype=np.float32).reshape(shape)  # a copy: never a view into the file's memory map


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, as a float32 column."""
    return blocks[:, start : start + 2].copy().view("<f2").astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: scale d (f16), 16 bytes of nibbles; x = (q - 8) * d, low nibbles first then high."""
    d, qs = _half(blocks, 0), blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return q.astype(np.float32) * d


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: scale d and minimum m (f16), 16 bytes of nibbles; x = q * d + m, low nibbles first."""
    d, m, qs = _half(blocks, 0), _half(blocks, 2), blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    return q.astype(np.float32) * d + m


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: scale d (f16), 32 signed bytes; x = q * d."""
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _half(blocks, 0)


_BLOCK_DEQUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}


def permute_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py gives q_proj/k_proj (`heads` = the key/value
    heads for k_proj): within each head, the rotate-half pairs (i, i + d/2) become adjacent rows
    (2i, 2i + 1), the interleaved layout ggml's rope reads."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of `permute_rope`: back to the Hugging Face (rotate-half) row order."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_llama_name(name: str) -> Optional[str]:
    """The Hugging Face Llama name of a GGUF tensor (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`), or None for one transformers has no place for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK_PATTERN.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def llama_config(gguf: GGUFFile) -> dict[str, Any]:
    """A transformers MistralConfig (and LlamaConfig) dict from the GGUF's `llama.*` metadata;
    `sliding_window: null` makes Mistral's attention Llama's."""
    meta = gguf.metadata
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ArtifactError(
            f"{gguf.path}: only Llama-architecture GGUF files convert; expected general.architecture='llama'. "
            f"Received: general.architecture={architecture!r}"
        )

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ArtifactError(f"{gguf.path}: GGUF metadata key llama.{key} is missing; cannot build the model config")
        return meta[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise ArtifactError(
            f"{gguf.path}: TFMistralForCausalLM needs head_dim * heads == hidden size. "
            f"Received: head_dim={head_dim}, heads={heads}, hidden={hidden}"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in gguf.tensors:
        raise ArtifactError(
            f"{gguf.path}: rope scaling does not convert; expected llama.rope.scaling.type='none' and no rope_freqs. "
            f"Received: llama.rope.scaling.type={scaling!r}"
        )
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _float32_decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(meta.get("llama.rope.freq_base", 10000.0)),
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for name, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{name}_token_id"), int):
            config[field] = meta[f"tokenizer.ggml.{name}_token_id"]
    return config


def _float32_decimal(value: float) -> float:
    """The shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def llama_state(gguf: GGUFFile, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array) of every tensor, one at a time, q/k rows back in Hugging
    Face order; a tied output layer is also yielded as `lm_head.weight` (TFMistralForCausalLM has
    its own lm_head and never ties it)."""
    for name in gguf.tensors:
        hf_name = hf_llama_name(name)
        if hf_name is None:
            raise ArtifactError(f"{gguf.path}: tensor {name} has no Hugging Face Llama counterpart; cannot convert")
        values = gguf.tensor(name)
        if hf_name.endswith("q_proj.weight"):
            values = unpermute_rope(values, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            values = unpermute_rope(values, config["num_key_value_heads"])
        yield hf_name, values
        if hf_name == "model.embed_tokens.weight" and config["tie_word_embeddings"]:
            yield "lm_head.weight", values


def _state_shapes(gguf: GGUFFile, config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """What `llama_state` yields, by name and shape, without reading any tensor data."""
    shapes = []
    for name, info in gguf.tensors.items():
        hf_name = hf_llama_name(name)
        if hf_name is None:
            raise ArtifactError(f"{gguf.path}: tensor {name} has no Hugging Face Llama counterpart; cannot convert")
        shapes.append((hf_name, info.shape))
        if hf_name == "model.embed_tokens.weight" and config["tie_word_embeddings"]:
            shapes.append(("lm_head.weight", info.shape))
    return shapes


def write_safetensors_streaming(path: Path, shapes: list[tuple[str, tuple[int, ...]]], arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Write float32 tensors to a safetensors file one at a time (the header is known from `shapes`
    up front), so converting holds one tensor in memory, not the whole model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape, dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for (expected, shape), (name, values) in zip(shapes, arrays, strict=True):
            if name != expected or values.shape != tuple(shape):
                raise ArtifactError(f"{path}: tensor {name} {values.shape} out of order; expected {expected} {shape}")
            _write_array(out, np.ascontiguousarray(values, dtype="<f4"))


def _write_array(out: BinaryIO, values: np.ndarray) -> None:
    out.write(memoryview(values.reshape(-1)).cast("B"))


PRE_TOKENIZER_SPLITS = {
    "smollm": [r"\p{N}"],
    "starcoder": [r"\p{N}"],
    "refact": [r"\p{N}"],
    "gpt-2": [],
}
"""Per `tokenizer.ggml.pre`: the regexes llama.cpp (llama-vocab.cpp) splits with before GPT-2's
byte-level pattern, each piece isolated; for "smollm" that is every digit on its own. Other
values (llama.cpp's "default" included) use other patterns and are refused."""

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4
"""`tokenizer.ggml.token_type` values of the tokens that become added (special) tokens."""


def bpe_tokenizer_json(gguf: GGUFFile) -> str:
    """A `tokenizers` tokenizer.json for the GGUF's byte-level BPE (`tokenizer.ggml.model` 'gpt2'):
    its vocabulary and merges, llama.cpp's pre-tokenizer for `tokenizer.ggml.pre`, its control and
    user-defined tokens as added tokens, and a BOS added only where `tokenizer.ggml.add_bos_token` says so."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    meta = gguf.metadata
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ArtifactError(
            f"{gguf.path}: only byte-level BPE tokenizers convert; expected tokenizer.ggml.model='gpt2'. "
            f"Received: tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}"
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ArtifactError(
            f"{gguf.path}: unknown llama.cpp pre-tokenizer; expected one of {sorted(PRE_TOKENIZER_SPLITS)}. "
            f"Received: tokenizer.ggml.pre={pre!r}"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in PRE_TOKENIZER_SPLITS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    bos = _token(gguf, "bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]),
        ])
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_tokens(
        [
            AddedToken(tokens[index], special=kind == TOKEN_TYPE_CONTROL, normalized=False)
            for index, kind in enumerate(types)
            if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        ]
    )
    return backend.to_str(pretty=True)


def _token(gguf: GGUFFile, name: str) -> Optional[str]:
    index = gguf.metadata.get(f"tokenizer.ggml.{name}_token_id")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens") or []
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None


def tokenizer_config(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens and the GGUF's chat template."""
    meta = gguf.metadata
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    }
    for name, field in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        token = _token(gguf, name)
        if token is not None:
            result[field] = token
    if "tokenizer.chat_template" in meta:
        result["chat_template"] = meta["tokenizer.chat_template"]
    return result


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the special token ids, nothing sampled by default."""
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}


def convert_llama_gguf(gguf_path: Path, directory: Path) -> Path:
    """Write the transformers checkpoint of the Llama GGUF file into `directory` (existing, empty):
    config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json, generation_config.json."""
    with GGUFFile(gguf_path) as gguf:
        config = llama_config(gguf)
        write_text(directory / "tokenizer.json", bpe_tokenizer_json(gguf))
        write_json(directory / "tokenizer_config.json", tokenizer_config(gguf, config))
        write_json(directory / "generation_config.json", generation_config(config))
        with atomic_path(directory / "model.safetensors") as weights:
            write_safetensors_streaming(weights, _state_shapes(gguf, config), llama_state(gguf, config))
        write_json(directory / "config.json", config)
    return directory
