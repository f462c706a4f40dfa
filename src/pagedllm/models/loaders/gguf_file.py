"""A fast, defensive reader for GGUF files.

`gguf.GGUFReader` builds a numpy view per array element, which costs ~6 s on a 49k-token
vocabulary. This reader memory-maps the file, reads numeric arrays with one `np.frombuffer`
and string arrays with a tight loop over a memoryview, and checks every count against the
bytes that remain so a hostile header can never ask for a huge allocation. The format's
constants (value types, quantisation block sizes) come from the `gguf` package.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ...errors import PagedLLMError, shown

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8
MAX_KEY_BYTES = 65535  # the GGUF spec's bound on a metadata key
MAX_TENSOR_NAME_BYTES = 256  # ggml's own is 64 (GGML_MAX_NAME)

_SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("<u1"),
}


class GGUFError(PagedLLMError, ValueError):
    """A GGUF file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: the slowest dimension first
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Sequential little-endian reads over a buffer, each bounded by the bytes left."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated or corrupt file: {what} needs {n} bytes")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")

    def string(self, what: str, max_bytes: int | None = None) -> str:
        length = self.uint(8, f"length of {what}")
        if max_bytes is not None and length > max_bytes:
            raise self.fail(f"a {what} of {length} bytes (at most {max_bytes})")
        return bytes(self.take(length, what)).decode("utf-8", errors="replace")

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype, count=count)

    def string_array(self, count: int, what: str) -> list[str]:
        # Each string needs at least its 8-byte length: reject absurd counts before looping.
        if count * 8 > len(self.buf) - self.pos:
            raise self.fail(f"{what} claims {count} strings, more than the file can hold")
        buf, pos, out = self.buf, self.pos, []
        end = len(buf)
        for _ in range(count):
            length = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
            if pos + length > end:
                self.pos = pos
                raise self.fail(f"truncated or corrupt file: a string of {what} runs past the end")
            out.append(str(buf[pos : pos + length], "utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out


def _value_type(code: int, cursor: _Cursor, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise cursor.fail(f"metadata key {key} has unknown value type {code}") from None


def _read_value(cursor: _Cursor, vtype: GGUFValueType, key: str, depth: int = 0) -> Any:
    if vtype == GGUFValueType.STRING:
        return cursor.string(key)
    if vtype == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise cursor.fail(f"{key} nests arrays more than {MAX_ARRAY_NESTING} deep")
        item_type = _value_type(cursor.uint(4, f"item type of {key}"), cursor, key)
        count = cursor.uint(8, f"length of {key}")
        if item_type == GGUFValueType.STRING:
            return cursor.string_array(count, key)
        if item_type == GGUFValueType.ARRAY:
            if count > len(cursor.buf):
                raise cursor.fail(f"{key} claims {count} nested arrays")
            return [_read_value(cursor, item_type, key, depth + 1) for _ in range(count)]
        values = cursor.array(_SCALAR_DTYPES[item_type], count, key)
        return values.astype(bool) if item_type == GGUFValueType.BOOL else values
    value = cursor.array(_SCALAR_DTYPES[vtype], 1, key)[0]
    return bool(value) if vtype == GGUFValueType.BOOL else value.item()


def _tensor_nbytes(ggml_type: GGMLQuantizationType, shape: tuple[int, ...], name: str, path: str) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    n_elements = math.prod(shape)  # Python's integers: a product past int64 must not wrap into a small size
    if shape and shape[-1] % block_size:
        raise GGUFError(f"{path}: tensor {shown(name)} row of {shape[-1]} is not a multiple of block {block_size}")
    return n_elements // block_size * type_size


class GGUFFile:
    """Metadata and tensor index of one GGUF file; tensor data stays memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mmap)
        cursor = _Cursor(self._buf, self.path)
        self.version, n_tensors, n_kv = self._read_header(cursor)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string("metadata key", MAX_KEY_BYTES)
            label = shown(key)  # how messages name it: cut short
            vtype = _value_type(cursor.uint(4, f"value type of {label}"), cursor, label)
            self.metadata[key] = _read_value(cursor, vtype, label)
        infos = [self._read_tensor_info(cursor) for _ in range(n_tensors)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {alignment} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, rel_offset in infos:
            nbytes = _tensor_nbytes(ggml_type, shape, name, self.path)
            offset = data_start + rel_offset
            if offset + nbytes > size:
                raise GGUFError(
                    f"{self.path}: tensor {shown(name)} needs bytes {offset}..{offset + nbytes} "
                    f"but the file has {size}: truncated or corrupt"
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, offset, nbytes)

    def _read_header(self, cursor: _Cursor) -> tuple[int, int, int]:
        magic = bytes(cursor.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (its magic bytes are not {GGUF_MAGIC!r})")
        version = cursor.uint(4, "version")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}{hint}; pagedllm reads 2 and 3")
        n_tensors, n_kv = cursor.uint(8, "tensor count"), cursor.uint(8, "metadata count")
        # The smallest metadata entry takes 13 bytes and the smallest tensor entry 28.
        if n_kv * 13 + n_tensors * 28 > len(cursor.buf):
            raise cursor.fail(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file holds")
        return version, n_tensors, n_kv

    def _read_tensor_info(self, cursor: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = cursor.string("tensor name", MAX_TENSOR_NAME_BYTES)
        label = shown(name)
        n_dims = cursor.uint(4, f"dimension count of {label}")
        if n_dims > MAX_DIMS:
            raise cursor.fail(f"tensor {shown(name)} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [cursor.uint(8, f"dimensions of {label}") for _ in range(n_dims)]
        type_code = cursor.uint(4, f"type of {label}")
        try:
            ggml_type = GGMLQuantizationType(type_code)
        except ValueError:
            raise cursor.fail(f"tensor {shown(name)} has unknown type {type_code}") from None
        offset = cursor.uint(8, f"offset of {label}")
        if any(d <= 0 or d > len(cursor.buf) * 8 for d in dims):
            raise cursor.fail(f"tensor {shown(name)} has impossible dimensions {dims}")
        return name, tuple(reversed(dims)), ggml_type, offset

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The raw bytes of a tensor, as a read-only uint8 view of the mapped file."""
        return np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release(self, info: TensorInfo) -> None:
        """Drop the resident pages of a tensor that was copied out (they reload from the file if read)."""
        start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: required metadata key {shown(key)} is missing")
        return self.metadata[key]


@lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """A parsed GGUF, shared by the model and tokenizer loaders (re-read if the file changes)."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError:
        return GGUFFile(path)  # raises the clear "no such file" error
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)
