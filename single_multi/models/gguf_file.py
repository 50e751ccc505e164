"""A fast GGUF (v2/v3) index: metadata and memory-mapped tensor views; dequantisation by `gguf`.

`gguf.GGUFReader` builds a numpy view per array element (100k+ for a tokenizer vocabulary), which
costs seconds before any tensor is read. This reader walks the header once with `struct`, keeps
tensor data memory-mapped and leaves dequantisation to `gguf.quants.dequantize`.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from typing import Any

import gguf
import numpy as np

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_FLOAT_TYPES = {0: np.float32, 1: np.float16, 30: "bfloat16"}


class GGUFError(ValueError):
  """The file is not a readable GGUF file (names the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  shape: tuple[int, ...]  # numpy order (GGUF dims reversed): [out, in] for a linear weight.
  ggml_type: int
  offset: int  # Absolute byte offset in the file.
  nbytes: int


class GGUFFile:
  """Metadata dict plus lazily dequantised tensors of one GGUF file."""

  def __init__(self, path: str):
    self.path = str(path)
    try:
      with open(self.path, "rb") as f:
        self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
      raise GGUFError(f"cannot open GGUF file {self.path}: {e}") from None
    try:
      self.metadata, self.tensors = self._parse()
    except (struct.error, UnicodeDecodeError, IndexError) as e:
      raise GGUFError(f"{self.path} is not a valid GGUF file (truncated or corrupt header: {e})") \
          from None

  def _parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    buf, pos = self._buf, 0

    def read(fmt):
      nonlocal pos
      (value,) = struct.unpack_from("<" + fmt, buf, pos)
      pos += struct.calcsize(fmt)
      return value

    def read_str():
      nonlocal pos
      n = read("Q")
      s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
      pos += n
      return s

    def read_value(vtype):
      nonlocal pos
      if vtype in _SCALARS:
        return read(_SCALARS[vtype])
      if vtype == 8:
        return read_str()
      if vtype == 9:
        etype, count = read("I"), read("Q")
        if etype in _NUMPY:
          arr = np.frombuffer(buf, _NUMPY[etype], count, pos)
          pos += arr.nbytes
          return arr
        return [read_value(etype) for _ in range(count)]
      raise GGUFError(f"{self.path}: unknown GGUF value type {vtype}")

    if bytes(buf[:4]) != b"GGUF":
      raise GGUFError(f"{self.path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    pos = 4
    version = read("I")
    if version not in (2, 3):
      raise GGUFError(f"{self.path}: unsupported GGUF version {version}")
    n_tensors, n_kv = read("Q"), read("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
      key = read_str()
      meta[key] = read_value(read("I"))
    infos = []
    for _ in range(n_tensors):
      name = read_str()
      dims = [read("Q") for _ in range(read("I"))]
      infos.append((name, tuple(reversed(dims)), read("I"), read("Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    tensors = {}
    for name, shape, ggml_type, offset in infos:
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
      nbytes = int(np.prod(shape)) // block * type_size
      start = data_start + offset
      if start + nbytes > len(buf):
        raise GGUFError(f"{self.path} is truncated: tensor {name!r} needs bytes "
                        f"[{start}, {start + nbytes}) but the file has {len(buf)}")
      tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    return meta, tensors

  def tensor(self, name: str) -> np.ndarray:
    """The tensor as float32 (quantised types dequantised), or its own float dtype."""
    info = self.tensors[name]
    raw = np.frombuffer(self._buf, np.uint8, info.nbytes, info.offset)
    if info.ggml_type in _FLOAT_TYPES:
      dtype = _FLOAT_TYPES[info.ggml_type]
      if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
      return raw.view(dtype).reshape(info.shape)
    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
    return gguf.quants.dequantize(rows, qtype).reshape(info.shape)
