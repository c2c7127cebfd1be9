"""A fast reader for a GGUF file's metadata and tensor table, without its tensor data.

`gguf.GGUFReader` builds numpy views for every field, which takes seconds on a vocabulary of
50k-150k strings. Resolving a model and reading its config only need the scalars, the tensor
names and shapes, so this walks the header with `struct` and skips string arrays it is not
asked for (their length is still recorded). `gguf_weights.tensor_arrays` maps the tensor data
through the table read here.
"""

from __future__ import annotations

import mmap
import pathlib
import struct
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from splitserve.engine.errors import ModelSpecError

GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types with a fixed width: type id -> struct format.
_SCALAR_FORMATS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensorInfo:
    """One entry of the tensor table."""

    name: str
    #: Shape in torch order (slowest-moving dimension first), the reverse of ggml's.
    shape: tuple[int, ...]
    #: ggml type id (`gguf.GGMLQuantizationType`).
    ggml_type: int
    #: Byte offset from the start of the data section.
    offset: int


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file says about itself, tensor data excluded."""

    path: pathlib.Path
    version: int
    #: key -> value; string arrays appear only when asked for, as lists.
    metadata: dict[str, Any]
    #: key -> element count, for every array (string arrays included).
    array_lengths: dict[str, int]
    #: name -> tensor info, in file order.
    tensors: dict[str, GgufTensorInfo]
    #: Absolute byte offset of the data section.
    data_start: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def is_gguf_file(path: pathlib.Path) -> bool:
    """Whether `path` starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_header(path: pathlib.Path, string_arrays: Container[str] = ()) -> GgufHeader:
    """Parse metadata and the tensor table of `path`.

    `string_arrays` names the string-array keys to decode (e.g. `tokenizer.ggml.tokens`); the
    others are skipped and only their length is kept. Raises ModelSpecError on a file that is
    not a readable GGUF v2/v3.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            return _parse(path, blob, string_arrays)
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ModelSpecError):
            raise
        raise ModelSpecError(f"{path} is not a readable GGUF file: {e}") from e


def _parse(path: pathlib.Path, blob: mmap.mmap, string_arrays: Container[str]) -> GgufHeader:
    if blob[:4] != GGUF_MAGIC:
        raise ModelSpecError(f"{path} does not start with the GGUF magic bytes")
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise ModelSpecError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    pos = 24
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if value_type == _ARRAY:
            (elem_type, count) = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            array_lengths[key] = count
            if elem_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[elem_type]
                width = struct.calcsize(fmt)
                metadata[key] = list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos))
                pos += count * width
            elif elem_type == _STRING:
                if key in string_arrays:
                    values = []
                    for _ in range(count):
                        value, pos = _read_string(blob, pos)
                        values.append(value)
                    metadata[key] = values
                else:
                    for _ in range(count):
                        (length,) = struct.unpack_from("<Q", blob, pos)
                        pos += 8 + length
            else:
                raise ModelSpecError(f"{path}: metadata key {key!r} holds arrays of type {elem_type}")
        else:
            metadata[key], pos = _read_value(path, key, blob, pos, value_type)

    tensors: dict[str, GgufTensorInfo] = {}
    for _ in range(tensor_count):
        name, pos = _read_string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos)
        pos += 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if name in tensors:
            raise ModelSpecError(f"{path} holds two tensors named {name!r}")
        tensors[name] = GgufTensorInfo(name, tuple(reversed(dims)), ggml_type, offset)

    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = (pos + alignment - 1) // alignment * alignment
    return GgufHeader(path, version, metadata, array_lengths, tensors, data_start)


def _read_value(path: pathlib.Path, key: str, blob: mmap.mmap, pos: int, value_type: int):
    if value_type == _STRING:
        return _read_string(blob, pos)
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is None:
        raise ModelSpecError(f"{path}: metadata key {key!r} has unknown value type {value_type}")
    (value,) = struct.unpack_from(fmt, blob, pos)
    return value, pos + struct.calcsize(fmt)


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    pos += 8
    return blob[pos : pos + length].decode("utf-8"), pos + length
