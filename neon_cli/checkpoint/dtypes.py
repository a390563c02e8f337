"""Element types without torch: each dtype's torch name, size, kind, the numpy dtype of its bits,
and its names in safetensors headers and legacy torch pickles (``torch.FloatStorage``); parsing of
``--dtype``. A module of its own so that every reader (core, the unpickler, the stand-ins) can use
the table without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neon_cli.errors import CheckpointError, UsageError


@dataclass(frozen=True)
class DType:
    """One element type: torch name, bytes per element, kind, numpy dtype of its *bits*, names
    in safetensors headers and in torch pickles (``torch.FloatStorage``)."""

    name: str
    itemsize: int
    kind: str  # "f" floating, "i" signed, "u" unsigned, "b" bool, "c" complex
    numpy: str  # numpy dtype holding the element's bits (little-endian)
    st: str | None  # safetensors dtype code
    storage: str | None  # legacy torch storage class name

    @property
    def is_floating(self) -> bool:
        return self.kind == "f"


_TABLE = [
    DType("float64", 8, "f", "<f8", "F64", "DoubleStorage"),
    DType("float32", 4, "f", "<f4", "F32", "FloatStorage"),
    DType("float16", 2, "f", "<f2", "F16", "HalfStorage"),
    DType("bfloat16", 2, "f", "<u2", "BF16", "BFloat16Storage"),
    DType("float8_e4m3fn", 1, "f", "u1", "F8_E4M3", None),
    DType("float8_e5m2", 1, "f", "u1", "F8_E5M2", None),
    DType("int64", 8, "i", "<i8", "I64", "LongStorage"),
    DType("int32", 4, "i", "<i4", "I32", "IntStorage"),
    DType("int16", 2, "i", "<i2", "I16", "ShortStorage"),
    DType("int8", 1, "i", "i1", "I8", "CharStorage"),
    DType("uint8", 1, "u", "u1", "U8", "ByteStorage"),
    DType("uint16", 2, "u", "<u2", "U16", None),
    DType("uint32", 4, "u", "<u4", "U32", None),
    DType("uint64", 8, "u", "<u8", "U64", None),
    DType("bool", 1, "b", "?", "BOOL", "BoolStorage"),
    DType("complex64", 8, "c", "<c8", "C64", "ComplexFloatStorage"),
    DType("complex128", 16, "c", "<c16", None, "ComplexDoubleStorage"),
]
#: torch dtype name -> :class:`DType`.
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
#: safetensors header dtype code -> torch dtype name.
SAFETENSORS_DTYPES: dict[str, str] = {d.st: d.name for d in _TABLE if d.st}
#: torch dtype name -> safetensors code.
DTYPE_NAMES: dict[str, str] = {d.name: d.st for d in _TABLE if d.st}
#: legacy storage class name (``torch.FloatStorage``) -> torch dtype name.
STORAGE_DTYPES: dict[str, str] = {d.storage: d.name for d in _TABLE if d.storage}
STORAGE_DTYPES["UntypedStorage"] = "uint8"


def dtype_info(name: str) -> DType:
    """The :class:`DType` of a torch dtype name (``"bfloat16"``, ``torch.bfloat16`` also accepted)."""
    key = str(name).replace("torch.", "")
    try:
        return DTYPES[key]
    except KeyError:
        raise CheckpointError(f"dtype {name}: not supported") from None


def dtype_name(dtype: Any) -> str:
    """Short torch name of ``dtype`` (``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``)."""
    return str(dtype).replace("torch.", "")


def is_floating(dtype: Any) -> bool:
    return dtype_info(dtype_name(dtype)).is_floating


def itemsize(dtype: Any) -> int:
    return dtype_info(dtype_name(dtype)).itemsize


def to_torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, dtype_name(name))


_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}


def parse_dtype(text: Any) -> str | None:
    """``"float32"``/``"fp32"``/``"bf16"``/``torch.float16``/... -> a floating dtype name; UsageError naming ``--dtype``."""
    if text is None:
        return None
    try:
        return _ALIASES[dtype_name(text).strip().lower()]
    except KeyError:
        raise UsageError(f"--dtype {dtype_name(text)}: expected one of float32, float16, bfloat16, float64") from None
