"""Writes valid llama-architecture GGUF files with random weights, for tests and benchmarks.

The vocabulary is byte-level BPE (GPT-2 byte mapping, a few merges, ChatML control tokens) and the
file carries a Jinja2 chat template, so llama.cpp tokenizes, templates and generates with it like
any real model. Token throughput does not depend on weight values, so the `bench` shape (~0.7B
parameters, Q8_0) is a fair subject for speed measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = (
    "Ġ t",
    "h e",
    "Ġ a",
    "i n",
    "Ġt he",
    "e r",
    "o n",
    "Ġ s",
    "r e",
    "a t",
    "e n",
    "Ġ w",
    "o r",
    "Ġ o",
    "i s",
    "Ġ c",
    "Ġ b",
    "e s",
    "a n",
    "Ġ f",
    "i t",
    "Ġ p",
    "a l",
    "Ġ m",
    "e d",
    "a r",
)


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int


TINY = Shape(n_vocab=320, n_embd=64, n_layer=2, n_ff=128, n_head=4, n_head_kv=2, n_ctx=512)
# The same with a context long enough for a question and its passages (and for a long generation).
TINY_LONG = Shape(n_vocab=320, n_embd=64, n_layer=2, n_ff=128, n_head=4, n_head_kv=2, n_ctx=16384)
# About ten times slower to decode than TINY_LONG (some 2.5 ms a token on one core), with a long context:
# streams that hold their sequences for tens of seconds even on a busy two-core machine.
TINY_SLOW = Shape(n_vocab=320, n_embd=512, n_layer=4, n_ff=1536, n_head=8, n_head_kv=4, n_ctx=16384)
# Rows a multiple of 256, so k-quants (q4_K_M) apply to every matrix.
TINY_QUANTIZABLE = Shape(n_vocab=320, n_embd=256, n_layer=2, n_ff=512, n_head=4, n_head_kv=2, n_ctx=512)
BENCH_0_7B = Shape(n_vocab=32000, n_embd=1536, n_layer=20, n_ff=4096, n_head=12, n_head_kv=4, n_ctx=4096)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode mapping, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def _vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_symbols()
    merges = []
    for merge in _MERGES:
        left, right = merge.split(" ")
        if left + right not in tokens:
            tokens.append(left + right)
            merges.append(merge)
    filler = n_vocab - len(tokens) - len(SPECIAL_TOKENS)
    if filler < 0:
        raise ValueError(f"n_vocab must be at least {len(tokens) + len(SPECIAL_TOKENS)}")
    tokens += [f"tok{i}" for i in range(filler)]
    types = [int(TokenType.NORMAL)] * len(tokens) + [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    tokens += list(SPECIAL_TOKENS)
    return tokens, types, merges


def _random_q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 data laid out as llama.cpp expects: per 32 values an f16 scale and 32 int8."""
    blocks = np.zeros((rows, cols // 32), dtype=[("d", "<f2"), ("qs", "i1", (32,))])
    blocks["d"] = np.float16(0.02)
    blocks["qs"] = rng.integers(-127, 128, size=(rows, cols // 32, 32), dtype=np.int8)
    return blocks.view(np.uint8).reshape(rows, -1)


def write_gguf(
    path: Path,
    shape: Shape = TINY,
    *,
    quant: str = "f32",
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    name: str = "synthetic-llama",
) -> Path:
    """Write the model; `quant` is f32, f16 or q8_0 (matrices only; norms stay f32)."""
    rng = np.random.default_rng(seed)
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[
        quant
    ]
    writer = GGUFWriter(str(path), "llama", use_temp_file=False)
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(int(file_type))
    tokens, types, merges = _vocabulary(shape.n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    def matrix(tensor_name: str, rows: int, cols: int) -> None:
        if quant == "q8_0":
            writer.add_tensor(tensor_name, _random_q8_0(rng, rows, cols), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
            writer.add_tensor(tensor_name, data.astype(np.float16 if quant == "f16" else np.float32))

    def norm(tensor_name: str) -> None:
        writer.add_tensor(tensor_name, np.ones(shape.n_embd, dtype=np.float32))

    n_embd_kv = shape.n_embd // shape.n_head * shape.n_head_kv
    matrix("token_embd.weight", shape.n_vocab, shape.n_embd)
    norm("output_norm.weight")
    matrix("output.weight", shape.n_vocab, shape.n_embd)
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}."
        norm(prefix + "attn_norm.weight")
        matrix(prefix + "attn_q.weight", shape.n_embd, shape.n_embd)
        matrix(prefix + "attn_k.weight", n_embd_kv, shape.n_embd)
        matrix(prefix + "attn_v.weight", n_embd_kv, shape.n_embd)
        matrix(prefix + "attn_output.weight", shape.n_embd, shape.n_embd)
        norm(prefix + "ffn_norm.weight")
        matrix(prefix + "ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(prefix + "ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(prefix + "ffn_down.weight", shape.n_embd, shape.n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
