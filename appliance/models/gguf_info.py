"""Reading and validating GGUF files: the metadata `show` prints and the checks done before loading.

A small parser of our own rather than `gguf.GGUFReader`: it bounds-checks every read (a truncated
file or a tensor whose data runs past the end gives a clear error instead of a numpy slice error),
and it skips the contents of large arrays (the vocabulary) instead of materialising them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from appliance.errors import BadRequest

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 64 << 20  # a chat template or a token never comes near this
_MAX_ARRAY_KEPT = 64  # arrays longer than this are summarised (count only)
_MAX_DIMS = 8


class InvalidGGUF(BadRequest):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass
class GGUFInfo:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    array_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def parameter_count(self) -> int:
        total = 0
        for tensor in self.tensors:
            count = 1
            for dim in tensor.shape:
                count *= dim
            total += count
        return total

    @property
    def context_length(self) -> int | None:
        value = self.arch_value("context_length")
        return int(value) if value is not None else None

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if file_type is None:
            return "unknown"
        try:
            name = LlamaFileType(int(file_type)).name
        except ValueError:
            return f"type {file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def is_embedding_model(self) -> bool:
        return self.architecture in ("bert", "nomic-bert", "jina-bert-v2", "t5encoder") or bool(
            self.metadata.get(f"{self.architecture}.pooling_type")
        )

    def token_string(self, key: str) -> str:
        """The text of the token whose id is stored under `key` (e.g. tokenizer.ggml.eos_token_id)."""
        token_id = self.metadata.get(key)
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(token_id, int) and isinstance(tokens, list) and 0 <= token_id < len(tokens):
            return str(tokens[token_id])
        return ""

    def model_info(self) -> dict[str, Any]:
        """Ollama's `model_info`: the key/value metadata, large arrays left out as Ollama does."""
        info: dict[str, Any] = {"general.parameter_count": self.parameter_count}
        for key, value in self.metadata.items():
            if key in self.array_lengths or key == "tokenizer.chat_template":
                continue
            info[key] = value
        return dict(sorted(info.items()))


def format_parameter_count(count: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}".replace(".0" + suffix, suffix)
    return str(count)


class _Reader:
    def __init__(self, handle: BinaryIO, size: int):
        self.handle = handle
        self.size = size

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise InvalidGGUF("GGUF file is truncated (header ends early)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > _MAX_STRING or self.handle.tell() + length > self.size:
            raise InvalidGGUF("GGUF file is truncated or corrupt (string runs past the end)")
        return self.read(length).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.handle.tell() + n > self.size:
            raise InvalidGGUF("GGUF file is truncated or corrupt (array runs past the end)")
        self.handle.seek(n, 1)

    def value(self, kind: int, key: str, lengths: dict[str, int]) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind == _ARRAY:
                raise InvalidGGUF("GGUF nested arrays are not supported")
            if count > self.size:
                raise InvalidGGUF("GGUF file is corrupt (array length larger than the file)")
            keep = count <= _MAX_ARRAY_KEPT or key == "tokenizer.ggml.tokens"
            if count > _MAX_ARRAY_KEPT:
                lengths[key] = count
            if item_kind in _SCALARS:
                width = struct.calcsize(_SCALARS[item_kind])
                if not keep:
                    self.skip(width * count)
                    return None
                return list(struct.unpack(f"<{count}{_SCALARS[item_kind][1]}", self.read(width * count)))
            if item_kind == _STRING:
                items = []
                for _ in range(count):
                    if keep:
                        items.append(self.string())
                    else:
                        self.skip(self.unpack("<Q"))
                return items if keep else None
        raise InvalidGGUF(f"GGUF file is corrupt (unknown value type {kind} for '{key}')")


def read_gguf(path: Path) -> GGUFInfo:
    """Parse and validate a GGUF file's header and tensor table; raises InvalidGGUF with the reason."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, size)
        if size < 24 or reader.read(4) != GGUF_MAGIC:
            raise InvalidGGUF("not a GGUF file (bad magic number)")
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise InvalidGGUF(f"unsupported GGUF version {version}")
        tensor_count, kv_count = reader.unpack("<Q"), reader.unpack("<Q")
        if tensor_count > 1_000_000 or kv_count > 1_000_000:
            raise InvalidGGUF("GGUF file is corrupt (implausible tensor or key count)")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"), key, lengths)
        tensors = []
        for _ in range(tensor_count):
            name = reader.string()
            n_dims = reader.unpack("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise InvalidGGUF(f"GGUF tensor '{name}' has {n_dims} dimensions")
            shape = tuple(reader.unpack("<Q") for _ in range(n_dims))
            ggml_type, offset = reader.unpack("<I"), reader.unpack("<Q")
            tensors.append(TensorInfo(name, shape, ggml_type, offset, _tensor_bytes(name, shape, ggml_type)))
        alignment = int(metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise InvalidGGUF("GGUF file is corrupt (alignment is not a power of two)")
        data_start = -(-handle.tell() // alignment) * alignment
    for tensor in tensors:
        if tensor.offset % alignment or data_start + tensor.offset + tensor.n_bytes > size:
            raise InvalidGGUF(
                f"GGUF file is truncated or corrupt: tensor '{tensor.name}' data runs past the end of the file"
            )
    if not tensors:
        raise InvalidGGUF("GGUF file has no tensors")
    return GGUFInfo(version=version, metadata=metadata, tensors=tensors, array_lengths=lengths)


def _tensor_bytes(name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise InvalidGGUF(f"GGUF tensor '{name}' has unknown type {ggml_type}") from None
    elements = 1
    for dim in shape:
        elements *= dim
    if shape[0] % block_size:
        raise InvalidGGUF(f"GGUF tensor '{name}' row size is not a multiple of its block size")
    return elements // block_size * type_size
