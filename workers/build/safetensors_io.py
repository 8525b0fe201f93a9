"""Read slices of, and stream-write, safetensors files without holding a whole model in memory.

Reads use positioned file reads of only the bytes a slice needs (never a whole-file mmap), and the
writer lays out the header first and then appends one tensor at a time, so a build holds about one
tensor, not one rank file, in memory.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from meshserve.errors import UserError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # what model weights may be stored as
_CHUNK_BYTES = 64 << 20


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100 << 20:
                    raise ValueError("header too large")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as err:
            raise UserError(f"{path}: not a readable safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + size
        self.entries = header

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _pread(self, fd: int, offset: int, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{self.path}: file is truncated")
            done += n
        return buf

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The tensor, or rows/columns [start, stop) of it along dim 0 or 1."""
        entry = self.entries[name]
        dtype = _DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin = self.data_start + entry["data_offsets"][0]
        item = torch.empty((), dtype=dtype).element_size()
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if dim is None or (dim == 0):
                lo, hi = (0, shape[0] if shape else 1) if dim is None else (start, stop)
                nbytes = (hi - lo) * row_elems * item if shape else item
                raw = self._pread(fd, begin + lo * row_elems * item, nbytes)
                out_shape = shape if dim is None else [hi - lo] + shape[1:]
                return _from_bytes(raw, dtype, out_shape)
            if dim != 1 or len(shape) != 2:
                raise ValueError(f"slicing {name} along dim {dim} is not supported")
            rows, cols = shape
            rows_per_chunk = max(1, _CHUNK_BYTES // max(1, cols * item))
            parts = []
            for r0 in range(0, rows, rows_per_chunk):
                r1 = min(rows, r0 + rows_per_chunk)
                raw = self._pread(fd, begin + r0 * cols * item, (r1 - r0) * cols * item)
                parts.append(_from_bytes(raw, dtype, [r1 - r0, cols])[:, start:stop].clone())
            return torch.cat(parts, 0)
        finally:
            os.close(fd)


def _from_bytes(raw: bytearray, dtype: torch.dtype, shape) -> torch.Tensor:
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


class StreamingWriter:
    """Writes a safetensors file whose tensor list is known up front, one tensor at a time, in order."""

    def __init__(self, path: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order = []
        for name, dtype, shape in layout:
            n = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                n *= s
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, dtype, tuple(shape)))
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0
        self._rows = 0

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append rows of tensor `name` (all of it, or the next rows along dim 0); tensors come in order."""
        if self._next >= len(self._order):
            raise ValueError(f"writer got {name} after its last tensor")
        want, dtype, shape = self._order[self._next]
        whole = len(shape) == 0 or tuple(rows.shape) == shape
        fits = whole or (rows.dim() == len(shape) and tuple(rows.shape[1:]) == shape[1:]
                         and self._rows + rows.shape[0] <= shape[0])
        if name != want or rows.dtype != dtype or not fits:
            raise ValueError(f"expected {want} {dtype} {shape} (rows {self._rows} written), got {name} "
                             f"{rows.dtype} {tuple(rows.shape)}")
        if rows.numel():  # the tensor's own bytes: .tobytes() would copy them first
            self._file.write(memoryview(rows.contiguous().view(torch.uint8).numpy()))
        self._rows = shape[0] if whole and shape else self._rows + rows.shape[0]
        if not shape or self._rows == shape[0]:
            self._next, self._rows = self._next + 1, 0

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()
