"""Reading `.safetensors` files with torch and the standard library alone: an 8-byte header
length, a JSON header `{name: {"dtype", "shape", "data_offsets"}}`, then the raw little-endian
bytes. Every number in the header is checked before anything is allocated."""
import json
import math
import os
import struct
import sys
from typing import Dict

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # newer PyTorch versions
        DTYPES[_name] = getattr(torch, _attr)
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit


def looks_like_safetensors(path: str) -> bool:
    """A `.safetensors` name, or a file starting like one (PyTorch's start with `PK` or 0x80)."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2


def _invalid(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a valid safetensors file: {reason}")


def _entry(path: str, name: str, info, data_size: int):
    """(dtype, shape, begin, end) of one header entry, every value checked."""
    if not isinstance(info, dict):
        raise _invalid(path, f"the header entry of {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise _invalid(path, f"tensor {name!r} has the unknown dtype {dtype!r} "
                             f"(known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _invalid(path, f"tensor {name!r} has the shape {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        raise _invalid(path, f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _invalid(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                             f"{data_size} bytes of data")
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if numel * itemsize != end - begin:
        raise _invalid(path, f"tensor {name!r} ({dtype} {shape}) needs {numel * itemsize} "
                             f"bytes, its data_offsets give {end - begin}")
    return DTYPES[dtype], shape, begin, end


def from_little_endian(data: bytearray, dtype: torch.dtype, byteorder: str = sys.byteorder):
    """A 1-d tensor of the little-endian values in `data` (byte-swapped on big-endian hosts)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if byteorder == "little" or itemsize == 1:
        return torch.frombuffer(data, dtype=dtype)
    swapped = torch.frombuffer(data, dtype=torch.uint8).view(-1, itemsize).flip(1).contiguous()
    return swapped.view(-1).view(dtype)


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file (CPU, dtypes as stored), or a one-line ValueError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _invalid(path, f"{size} bytes, too short for the 8-byte header length")
        header_size = struct.unpack("<Q", head)[0]
        if header_size > size - 8:
            raise _invalid(path, f"its header length {header_size} is larger than the file "
                                 f"({size} bytes)")
        if header_size > MAX_HEADER_BYTES:
            raise _invalid(path, f"its header length {header_size} is over "
                                 f"{MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _invalid(path, f"its header is not JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(header, dict):
            raise _invalid(path, f"its header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        data_start, data_size = 8 + header_size, size - 8 - header_size
        entries = sorted(((name, *_entry(path, name, info, data_size))
                          for name, info in header.items()), key=lambda e: (e[3], e[4]))
        for (a, *_, a_end), (b, _, _, b_begin, _) in zip(entries, entries[1:]):
            if b_begin < a_end:
                raise _invalid(path, f"the data of tensors {a!r} and {b!r} overlap")
        tensors = {}
        for name, dtype, shape, begin, end in entries:
            data = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(data) != len(data):
                raise _invalid(path, f"the data of tensor {name!r} is cut short")
            tensors[name] = from_little_endian(data, dtype).reshape(shape)
    return tensors
