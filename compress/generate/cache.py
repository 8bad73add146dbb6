"""The teacher logit cache: a compact, memory-mapped, checksummed format the trainer reads lazily.

One row of each array per cached token (a completion token of some training row):

  ids        uint8  [N, ceil(k * bits / 8)]   the k ids, bit-packed at ``bits = ceil(log2(vocab))``
  logprobs   float16 [N, k]                   log p of those ids (T = 1), -inf for padding
  tail       float16 [N]                      log of the teacher mass outside the k ids (top-k caches)
  counts     uint16 [N, k]                    draws per id (sampled caches; 0 = padding)
  proposal   float16 [N, k]                   log r at the id, where the proposal r was not p

``cache.json`` holds the format name and version, the kind (``topk`` or ``sampled``), k, the
vocabulary size, the token count and, per array, its file, dtype, shape and sha256. At k = 20 and a
128k vocabulary a top-k token takes 43 + 40 + 2 = 85 bytes (a float32/int32 cache took 160).

Why by hand: the peers' formats (DistillKit's packed parquet, TRL's in-memory tensors) are not
libraries we can depend on, and ``.npy`` alone has no checksum, no bit packing and no append. Arrays
are appended through a stream, so writing never holds the cache in memory; reading maps the files
and decodes only the rows asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distillflow-logit-cache"
VERSION = 1
META = "cache.json"
# Stored dtype per array; decoded arrays are int64 ids and float32 values.
DTYPES = {"ids": np.uint8, "logprobs": np.float16, "tail": np.float16, "counts": np.uint16, "proposal": np.float16}


class CacheError(ValueError):
    """A logit cache that cannot be read: one line naming the directory and the problem."""


def id_bits(vocab_size: int) -> int:
    """Bits per packed id: enough for every id below ``vocab_size``."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2))))


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[n, k]`` ids -> ``[n, ceil(k * bits / 8)]`` bytes, little-endian bit order."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << bits):
        raise CacheError(f"id out of range for {bits}-bit packing: {ids.min()}..{ids.max()}")
    n, k = ids.shape
    planes = ((ids[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(n, k * bits)
    return np.packbits(planes, axis=1, bitorder="little")


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_ids``: ``[n, k]`` int64 ids."""
    packed = np.asarray(packed, dtype=np.uint8)
    planes = np.unpackbits(packed, axis=1, count=k * bits, bitorder="little").reshape(len(packed), k, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(-1)


def tail_logmass(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_k p) per row, from float32 log-probs (before they are rounded to float16)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    mass = np.exp(lp).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - mass, 0.0, 1.0))


class CacheWriter:
    """Appends rows of per-token arrays to ``directory``; ``close()`` writes ``cache.json``.

    ``kind`` is ``topk`` (``append(ids, logprobs)``) or ``sampled`` (``append(ids, logprobs,
    counts=..., proposal=None)``). Files are streamed and hashed as they are written.
    """

    def __init__(self, directory: Path, kind: str, k: int, vocab_size: int, extra: dict[str, Any] | None = None):
        if kind not in ("topk", "sampled"):
            raise ValueError(f"kind must be topk or sampled, not {kind!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / META).unlink(missing_ok=True)  # an unfinished cache never looks finished
        self.kind, self.k, self.vocab_size, self.bits = kind, k, vocab_size, id_bits(vocab_size)
        self.extra = extra or {}
        self.tokens = 0
        self._files: dict[str, Any] = {}
        self._hashes: dict[str, Any] = {}
        self._widths: dict[str, tuple[int, ...]] = {}

    def _write(self, name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=DTYPES[name])
        if name not in self._files:
            self._files[name] = (self.dir / f"{name}.bin").open("wb")
            self._hashes[name] = hashlib.sha256()
            self._widths[name] = arr.shape[1:]
        elif arr.shape[1:] != self._widths[name]:
            raise CacheError(f"{self.dir}: {name} rows of shape {arr.shape[1:]}, expected {self._widths[name]}")
        data = arr.tobytes()
        self._files[name].write(data)
        self._hashes[name].update(data)

    def append(
        self,
        ids: np.ndarray,
        logprobs: np.ndarray,
        counts: np.ndarray | None = None,
        proposal: np.ndarray | None = None,
    ) -> int:
        """Append ``n`` tokens (``[n, k]`` each); returns the offset of the first one."""
        ids = np.asarray(ids).reshape(-1, self.k)
        logprobs = np.asarray(logprobs, dtype=np.float32).reshape(-1, self.k)
        if len(ids) != len(logprobs):
            raise CacheError(f"{self.dir}: {len(ids)} id rows but {len(logprobs)} log-prob rows")
        if (self.kind == "sampled") != (counts is not None):
            raise CacheError(f"{self.dir}: counts go with a sampled cache, and only there")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise CacheError(f"{self.dir}: id {ids.max()} outside the vocabulary of {self.vocab_size}")
        offset = self.tokens
        self._write("ids", pack_ids(ids, self.bits))
        self._write("logprobs", logprobs)
        if self.kind == "topk":
            self._write("tail", tail_logmass(logprobs))
        else:
            self._write("counts", np.asarray(counts).reshape(-1, self.k))
            if proposal is not None:
                self._write("proposal", np.asarray(proposal, dtype=np.float32).reshape(-1, self.k))
        self.tokens += len(ids)
        return offset

    def close(self, rows: int) -> dict[str, Any]:
        """Flush the files and write ``cache.json`` last, so that a crash leaves no valid-looking cache."""
        arrays = {}
        for name in DTYPES:
            if name not in self._files:
                if name in ("ids", "logprobs"):  # an empty cache still has its two main arrays
                    width = (math.ceil(self.k * self.bits / 8),) if name == "ids" else (self.k,)
                    self._widths[name] = width
                    self._hashes[name] = hashlib.sha256()
                    (self.dir / f"{name}.bin").write_bytes(b"")
                else:
                    continue
            else:
                f = self._files[name]
                f.flush()
                os.fsync(f.fileno())
                f.close()
            arrays[name] = {
                "file": f"{name}.bin",
                "dtype": np.dtype(DTYPES[name]).name,
                "shape": [self.tokens, *self._widths[name]],
                "sha256": self._hashes[name].hexdigest(),
            }
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind, "k": self.k, "vocab_size": self.vocab_size,
                "id_bits": self.bits, "tokens": self.tokens, "rows": rows, "arrays": arrays, **self.extra}  # fmt: skip
        tmp = self.dir / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.dir / META)
        return meta


def _sha256_file(path: Path) -> str:
    # A buffered read, not through the map: hashing then adds nothing to the reader's RSS.
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class LogitCache:
    """A logit cache opened for reading: ``cache[offset:offset + n]`` decodes those tokens only.

    ``verify`` checks every array's sha256 first (a streamed read, not a load). A directory with the
    float32 ``ids.npy``/``logprobs.npy`` layout of earlier versions is read as it is.
    """

    def __init__(self, directory: Path, verify: bool = True):
        self.dir = Path(directory)
        meta_path = self.dir / META
        if not meta_path.is_file():
            self._open_legacy()
            return
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{meta_path}: not JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise CacheError(f"{meta_path}: not a {FORMAT} (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise CacheError(f"{meta_path}: version {meta.get('version')}, this code reads version {VERSION}")
        self.meta = meta
        self.kind, self.k, self.tokens = meta["kind"], meta["k"], meta["tokens"]
        self.bits = meta["id_bits"]
        self.arrays: dict[str, np.ndarray] = {}
        for name, spec in meta["arrays"].items():
            path = self.dir / spec["file"]
            if not path.is_file():
                raise CacheError(f"{path}: missing (the cache is incomplete)")
            expected = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
            if path.stat().st_size != expected:
                raise CacheError(f"{path}: {path.stat().st_size} bytes, cache.json says {expected}")
            if verify and _sha256_file(path) != spec["sha256"]:
                raise CacheError(f"{path}: checksum mismatch (the file changed after it was written)")
            if expected == 0:
                self.arrays[name] = np.zeros(spec["shape"], dtype=spec["dtype"])
            else:
                self.arrays[name] = np.memmap(path, dtype=spec["dtype"], mode="r", shape=tuple(spec["shape"]))

    def _open_legacy(self) -> None:
        ids, lps = self.dir / "ids.npy", self.dir / "logprobs.npy"
        if not (ids.is_file() and lps.is_file()):
            raise CacheError(f"{self.dir}: no {META} (not a teacher logit cache)")
        names = [n for n in ("ids", "logprobs", "counts", "proposal") if (self.dir / f"{n}.npy").is_file()]
        self.arrays = {n: np.load(self.dir / f"{n}.npy", mmap_mode="r") for n in names}
        self.kind = "sampled" if "counts" in self.arrays else "topk"
        self.k = self.arrays["ids"].shape[1]
        self.tokens = len(self.arrays["ids"])
        self.bits = 0  # legacy ids are stored unpacked
        self.meta = {"kind": self.kind, "k": self.k, "tokens": self.tokens, "version": 0}

    def __len__(self) -> int:
        return self.tokens

    def __getitem__(self, sl: slice) -> dict[str, np.ndarray]:
        """Decoded rows ``sl``: ids (int64), logprobs, and tail / counts / proposal (float32) where present."""
        out: dict[str, np.ndarray] = {}
        for name, arr in self.arrays.items():
            rows = np.asarray(arr[sl])
            if name == "ids":
                out[name] = unpack_ids(rows, self.k, self.bits) if self.bits else rows.astype(np.int64)
            else:
                out[name] = rows.astype(np.float32)
        return out

    def nbytes_per_token(self) -> float:
        """Bytes on disk per cached token (every array together)."""
        total = sum((self.dir / spec["file"]).stat().st_size for spec in self.meta.get("arrays", {}).values())
        return total / self.tokens if self.tokens else 0.0
