"""Streaming merge of safetensors checkpoints: WARP's SLERP of task vectors (+ LITI) at any size.

    warp-min-merge --init SFT --policies RL1 RL2 --out MERGED [--lam 0.5] [--eta 0.3]
    python warp_min.py merge ...   (the same)

The merge math is not here: it is warp_min.py's ("Weight-space operations"), reused as is --
`group_of` (which tensors share an angle), `tensor_gram` (float64 Gram of one tensor's task
vectors), `merge_coefficients` (SLERP/LERP coefficients c from a group's Gram matrix alone),
`combine` (theta_init + sum_m c_m delta_m for one tensor). This module is the I/O
around it, modelled on mergekit: lazy shard-by-shard reading, a streaming sharded writer, an index.

Design (why the merge never holds a model in memory):

- Listing and validation use `safe_open` (names, dtypes, shapes, header and file-size checks)
  without loading data. Data is then read in blocks -- runs of whole rows, ~`block_elems`
  elements -- as views of a memory map at the offsets in the safetensors header (Checkpoint.view):
  no copy, the kernels' first touch is the read. A block's pages are mapped in one madvise,
  the next 64 MB are asked for ahead (inputs on disk), and the pages are unmapped as soon as the
  block is consumed (Checkpoint.release). (safe_open's tensors are views of a memory map too, but
  every page touched stays in the RSS until the file is closed: for a streaming merge, the whole
  model.)
- Pass 1 reads each tensor of the M + 1 inputs block by block and adds the block's Gram matrix
  G[a, b] = <delta_a, delta_b> into its group's: block_gram, the value of tensor_gram at a
  fraction of its cost (float64 for fp32 inputs; for bf16/f16, fp32 dot products over 256
  elements summed in float64, within a proven 1.54e-5 sum |delta_a delta_b|, see its docstring and
  tests/test_merge_gram.py). Gram matrices are additive over disjoint pieces of the task vectors,
  so the per-group Gram -- and from it every angle and norm SLERP needs, for any M
  (merge_coefficients) -- comes out without ever concatenating a group into one vector. A
  non-finite input makes its tensor's Gram non-finite, so the check is free; the offending input
  is then named by re-reading that one tensor. Pass 1 writes nothing.
- Coefficients: one small M-vector c_g per group, from G_g alone.
- Pass 2 reads the same blocks again, computes theta_init + sum_m c_m delta_m (block_combine: bit
  for bit warp_min.combine, a cache-sized sub-block at a time) -- with
  LITI, (1 - eta) theta_init + eta theta_merged = theta_init + sum_m (eta c_m) delta_m, the same
  map as `liti` folded into the coefficients (one rounding to bf16, not two) -- and appends
  it to the output shard (whose safetensors header was written first: names, dtypes and shapes
  are known before any data is). Inputs are read twice; the output is written once.
- Held groups (--max-group-mb; by default only when the inputs do not fit in memory): a group whose
  raw bytes in all M + 1 inputs fit the budget is read once when its first tensor comes up in the
  write order -- Gram from those blocks (same code, same summation order as pass 1), coefficients,
  then combine from memory -- and pass 1 skips it. Bigger groups (and whatever does not fit
  alongside the groups still being written) are streamed as above, so granularity "model" normally
  streams. The output is byte-identical either way. Held blocks are the mapped pages themselves, not
  copies: holding costs RSS (file-backed, up to the budget), not time. It reads the inputs once,
  which pays when the page cache cannot keep them between the passes (a model larger than RAM;
  simulated with bench/merge.py --cold --evict-between-passes: 20-35% faster); otherwise the second
  pass re-reads memory and holding saves 0-12%. Default (max_group_mb=None): "auto" when the M + 1
  inputs are larger than the memory available now (MemAvailable: their second read would come from
  the disk), else 0 -- with the inputs cached, holding buys no time and doubles the RSS (~620 MB
  instead of ~310 MB on the bench). "auto" sizes the budget to stay under 2 x the largest tensor in
  float64.
- Peak memory is a few blocks per worker -- the mapped pages of M + 1 input blocks, the worker's
  sub-block work buffers, the output block -- plus up to WRITE_QUEUE_BLOCKS merged blocks waiting
  to be written (and the held groups, if any): independent of model size and of the
  largest tensor (~100 MB on top of the ~225 MB of a Python process with torch imported).
- Speed: blocks are processed by a few threads (each running torch single-threaded; torch
  releases the GIL), results consumed in a fixed order, so the sums -- and the output -- do not
  depend on the number of threads. Writes run on their own thread and each shard's fsync on
  another, overlapping the arithmetic. glibc is told to keep freed memory (see
  _retain_freed_memory). Inside a block the kernels work a sub-block (SUB_ELEMS) at a time in
  per-thread buffers that stay in the L2 cache. With the inputs in the page cache the merge is
  bound by memory traffic: the first touch of the mapped inputs (widening bf16 -> fp32) is ~35-40%
  of the CPU time of a single-threaded profile (bench/merge.py --profile), writing 8-20%, the
  deltas, the Gram and the combine ~10% each. The merge's I/O alone -- two read passes and the
  write, no arithmetic -- costs 1.4-1.9x a plain read + write of the same bytes on the bench, the
  merge ~2x (1.4-2.4x over runs, mostly the baseline's variation; 4.5x in the same runs before
  the block kernels and the mapped reads); with the inputs on disk, 1.2-1.3x streamed, ~1x held.
- Crash safety: the output is written into a hidden temporary directory (or file) beside --out,
  every file is fsync'ed, and only a complete output is renamed into place (with --overwrite the
  old output is moved aside first and deleted afterwards). A killed merge leaves either no --out
  or the previous complete one; its leftover `.NAME.warp-tmp-PID` is swept by the next merge.
- Everything a user can get wrong is checked before the first byte is written and reported as
  one line (CheckpointError): missing paths, pickle checkpoints, truncated/corrupt files, an index
  naming a missing shard, mismatched tensor names/shapes/dtypes, non-finite inputs, --out equal to
  (or containing) an input, an existing --out without --overwrite.

The output mirrors the init checkpoint: same shard files holding the same tensors, same index
(metadata.total_size recomputed), same dtypes (bf16 stays bf16), and its config/tokenizer files.
A single .safetensors file in gives a single file out. merge_report.json (inside the output
directory, or NAME.merge_report.json beside a single-file output) records the angles, norms,
coefficients, LERP fallbacks, non-finite checks, parameter counts and timings.
"""

import argparse
import collections
import concurrent.futures
import ctypes
import json
import math
import mmap
import os
import queue
import re
import resource
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

import warp_min

# Files copied from the init directory next to the merged weights when present.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json",
              # choice: also the other common tokenizer files, so the output is loadable as is
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MERGEABLE = {"F64", "F32", "F16", "BF16"}   # choice: integer/bool buffers are copied from init
# choice: 2^20 elements per streamed block (a worker's job; the arithmetic goes a sub-block of
# SUB_ELEMS at a time). A block costs a few madvise calls and some Python bookkeeping; a big one
# leaves the cache before it is written. bench/merge.py, one worker, against 2^20 in the same run:
# 2^18 +30%, 2^19 +10%, 2^21 +15-35%.
BLOCK_ELEMS = 1 << 20
MAX_GROUP_BYTES = 2 << 30                    # cap of --max-group-mb auto (raw bytes held)
WRITE_QUEUE_BLOCKS = 16                      # merged blocks waiting for the writer thread
PROGRESS_EVERY_S = 2.0
# choice: read ahead 64 MB per input file (bench/merge.py with the inputs on disk: see _read_ahead)
READ_AHEAD_BYTES = 64 << 20
# view() needs madvise (Python >= 3.8, not on Windows); MADV_POPULATE_READ is Linux >= 5.14 (value
# from <linux/mman.h>; the mmap module does not name it): without it pages fault in on first touch.
_CAN_MAP = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def _populate(mm, pos, nbytes):
    """Map the pages of [pos, pos + nbytes) now, in one call rather than a page fault every 16
    pages on first touch; when they are not cached, that is one read of the whole range."""
    global MADV_POPULATE_READ
    if MADV_POPULATE_READ is None:
        return
    lo = pos - pos % mmap.PAGESIZE
    try:
        mm.madvise(MADV_POPULATE_READ, lo, pos + nbytes - lo)
    except OSError:                          # EINVAL before Linux 5.14: fault pages in on touch
        MADV_POPULATE_READ = None


class CheckpointError(Exception):
    """A user mistake or a bad input; the message is one line naming the file/tensor/value."""


# ----------------------------------------------------------------------------------------------
# Reading: an HF directory (model.safetensors or shards + index) or one .safetensors file.
# ----------------------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    dtype: str        # safetensors dtype string, e.g. "BF16"
    shape: tuple
    file: str         # shard file name (inside Checkpoint.root)
    offset: int       # absolute byte offset of the data in that file

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.numel * DTYPE_BYTES[self.dtype]


def _pickle_refusal(path):
    return CheckpointError(
        f"{path}: pickle checkpoint refused (loading it can run arbitrary code); convert it to "
        f"safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
        f"safe_serialization=True)` or `safetensors.torch.save_file(torch.load(FILE, "
        f"weights_only=True), 'model.safetensors')`")


def _data_offsets(path):
    """(header length, {name: data start}) from the safetensors header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return n, {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


class Checkpoint:
    """Lazy view of one checkpoint: names, dtypes, shapes and shard layout; data read on demand."""

    def __init__(self, path):
        self.path, self._fds, self._maps, self._ahead = path, {}, {}, {}
        self._lock = threading.Lock()
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or directory")
        self.index = None
        if os.path.isdir(path):
            self.root, self.single_file = path, False
            if os.path.exists(os.path.join(path, INDEX_NAME)):
                self._read_index(os.path.join(path, INDEX_NAME))
            elif os.path.exists(os.path.join(path, SINGLE_NAME)):
                self.files = [SINGLE_NAME]
            else:
                names = sorted(os.listdir(path))
                pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
                if pickles:
                    raise _pickle_refusal(os.path.join(path, pickles[0]))
                others = [n for n in names if n.endswith(".safetensors")]
                raise CheckpointError(
                    f"{path}: no {SINGLE_NAME} or {INDEX_NAME}"
                    + (f" (found {', '.join(others[:3])}; pass a single file directly)" if others else ""))
        elif path.endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(path)
        elif path.endswith(".index.json"):
            self.root, self.single_file = os.path.dirname(path) or ".", False
            self._read_index(path)
        elif path.endswith(".safetensors"):
            self.root, self.single_file = os.path.dirname(path) or ".", True
            self.files = [os.path.basename(path)]
        else:
            raise CheckpointError(f"{path}: not a checkpoint (expected a directory, a .safetensors "
                                  f"file or a {INDEX_NAME})")
        self.tensors = {}
        for file in self.files:
            self._scan(file)
        if self.index is not None:
            stray = sorted(set(self.index["weight_map"]) ^ set(self.tensors))
            if stray:
                raise CheckpointError(f"{self.root}: index and shards disagree on {len(stray)} "
                                      f"tensor(s), e.g. {', '.join(stray[:3])}")

    def _read_index(self, index_path):
        try:
            with open(index_path) as f:
                self.index = json.load(f)
            weight_map = self.index["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from None
        self.files = sorted(set(weight_map.values()))
        for file in self.files:
            if not os.path.exists(os.path.join(self.root, file)):
                raise CheckpointError(f"{index_path}: names shard {file}, which is missing")

    def _scan(self, file):
        path = os.path.join(self.root, file)
        try:
            with safe_open(path, framework="pt") as handle:    # validates header and coverage
                header_len, offsets = _data_offsets(path)
                for name in sorted(handle.keys(), key=lambda n: offsets[n]):
                    if self.index is not None and self.index["weight_map"].get(name) != file:
                        continue    # reported by the index check in __init__
                    if name in self.tensors:
                        raise CheckpointError(f"{path}: tensor {name} also stored in "
                                              f"{self.tensors[name].file}")
                    sl = handle.get_slice(name)
                    self.tensors[name] = TensorInfo(name, sl.get_dtype(), tuple(sl.get_shape()),
                                                    file, 8 + header_len + offsets[name])
                self.metadata = getattr(self, "metadata", None) or handle.metadata()
        except (SafetensorError, OSError, ValueError, KeyError, struct.error) as e:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.tensors.values())

    def block_rows(self, name, block_elems=BLOCK_ELEMS):
        """[(first row, number of rows)] cutting the tensor into blocks of ~block_elems elements."""
        info = self.tensors[name]
        shape = info.shape or (1,)                       # scalars: one row of one element
        step = max(1, block_elems // max(math.prod(shape[1:]), 1))
        return [(start, min(step, shape[0] - start)) for start in range(0, shape[0], step)]

    def _byte_range(self, name, start, rows):
        info = self.tensors[name]
        shape = info.shape or (1,)                       # scalars: one row of one element
        rows = shape[0] - start if rows is None else rows
        row_bytes = math.prod(shape[1:]) * DTYPE_BYTES[info.dtype]
        return info, rows, info.offset + start * row_bytes, rows * row_bytes

    def view(self, name, start=0, rows=None):
        """Rows [start, start + rows) of a tensor, as a tensor over the file's pages: no copy.

        Why not read(): a pread copies every byte into a fresh buffer, and the merge reads each
        input twice; with the inputs in the page cache, the kernels' first touch of the mapped
        pages is all the reading there is (bench/merge.py --profile: "read" + "widen"). The file
        is memory-mapped (copy-on-write: nothing can reach the file) and the block's pages are
        mapped in one madvise(MADV_POPULATE_READ) -- from the page cache, or read from disk.
        Mapped pages count in the RSS (the reason read() exists): the merge calls release() as
        soon as a block is consumed, so the RSS holds a few blocks, as with pread. (A file
        truncated by someone else while the merge runs is then a SIGBUS, not an error line.)
        """
        info, rows, pos, nbytes = self._byte_range(name, start, rows)
        if nbytes == 0 or not _CAN_MAP:
            return self.read(name, start, rows)
        mm = self._map(info.file)
        self._read_ahead(info.file, mm, pos, nbytes)
        _populate(mm, pos, nbytes)
        flat = torch.frombuffer(mm, dtype=TORCH_DTYPES[info.dtype],
                                count=nbytes // DTYPE_BYTES[info.dtype], offset=pos)
        return flat.reshape((rows,) + info.shape[1:] if info.shape else ())

    def release(self, name, start=0, rows=None):
        """Unmap the pages of a view() (MADV_DONTNEED: they leave the RSS, stay in the page cache).

        Harmless for a neighbouring block sharing an edge page: its next touch maps it again."""
        info, rows, pos, nbytes = self._byte_range(name, start, rows)
        mm = self._maps.get(info.file)
        if mm is not None and nbytes:
            lo = pos - pos % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, min(pos + nbytes, len(mm)) - lo)

    def _read_ahead(self, file, mm, pos, nbytes):
        """Ask the kernel to read READ_AHEAD_BYTES past this block (MADV_WILLNEED: asynchronous,
        ~free on cached pages). Page faults read a file synchronously, a window at a time: with
        the inputs on disk, the merge would otherwise wait for every window in turn, where read()
        overlaps its kernel readahead with the arithmetic."""
        with self._lock:
            lo, hi = self._ahead.get(file, (0, 0))
            if lo <= pos and pos + nbytes + READ_AHEAD_BYTES // 2 <= hi:
                return                                    # well inside the window requested
            start = hi if lo <= pos < hi else pos
            self._ahead[file] = (pos, pos + nbytes + READ_AHEAD_BYTES)
        lo = start - start % mmap.PAGESIZE
        end = min(pos + nbytes + READ_AHEAD_BYTES, len(mm))
        if end > lo:
            mm.madvise(mmap.MADV_WILLNEED, lo, end - lo)

    def _map(self, file):
        with self._lock:                                  # worker threads share the checkpoint
            if file not in self._maps:
                self._maps[file] = mmap.mmap(self._fd_locked(file), 0, access=mmap.ACCESS_COPY)
            return self._maps[file]

    def read(self, name, start=0, rows=None):
        """Rows [start, start + rows) of a tensor, as a new tensor in its stored dtype.

        Read with pread into a fresh buffer rather than through safe_open's tensors: those are
        zero-copy views of a memory map, and every page touched stays in the process's RSS until
        the file is closed -- a whole-model "leak" for a streaming merge. pread is positional, so
        worker threads can share the file descriptor. The merge itself uses view() + release() (the
        same map, its pages given back block by block); read() serves the tensors copied as they
        are, the search for a non-finite input, and systems without madvise.
        """
        info, rows, pos, nbytes = self._byte_range(name, start, rows)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        while len(view):
            n = os.preadv(self._fd(info.file), [view], pos)
            if n <= 0:
                raise CheckpointError(f"{os.path.join(self.root, info.file)}: truncated while "
                                      f"reading tensor {name}")
            view, pos = view[n:], pos + n
        shape = (rows,) + info.shape[1:] if info.shape else ()
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def blocks(self, name, block_elems=BLOCK_ELEMS):
        """Yield the tensor as consecutive row blocks of at most ~block_elems elements."""
        for start, rows in self.block_rows(name, block_elems):
            yield self.read(name, start, rows)

    def _fd(self, file):
        with self._lock:
            return self._fd_locked(file)

    def _fd_locked(self, file):
        if file not in self._fds:
            self._fds[file] = os.open(os.path.join(self.root, file), os.O_RDONLY)
        return self._fds[file]

    def close(self):
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:        # a view is still alive: unmapped when it is collected
                pass
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._maps = {}, {}

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def files_in_order(self):
        """{shard file: [tensor names in on-disk order]} -- the layout the output mirrors."""
        layout = {f: [] for f in self.files}
        for t in self.tensors.values():
            layout[t.file].append(t.name)
        return layout


def check_compatible(init, policies, limit=3):
    """All checkpoints must hold the same tensor names, shapes and dtypes (first few listed)."""
    for pol in policies:
        problems = []
        for name in sorted(set(init.tensors) | set(pol.tensors)):
            a, b = init.tensors.get(name), pol.tensors.get(name)
            if a is None:
                problems.append(f"{name} only in the policy")
            elif b is None:
                problems.append(f"{name} missing")
            elif a.shape != b.shape:
                problems.append(f"{name} shape {list(b.shape)} vs {list(a.shape)}")
            elif a.dtype != b.dtype:
                problems.append(f"{name} dtype {b.dtype} vs {a.dtype}")
        if problems:
            more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
            raise CheckpointError(f"{pol.path} does not match init {init.path}: "
                                  f"{'; '.join(problems[:limit])}{more}")
    for t in init.tensors.values():
        if t.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{init.path}: tensor {t.name} has dtype {t.dtype}, which this "
                                  f"merge does not support (floating point: F64, F32, F16, BF16)")


# ----------------------------------------------------------------------------------------------
# Writing: one safetensors file streamed tensor by tensor, header first.
# ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Streams one .safetensors file: the header (all names/dtypes/shapes/offsets) is known up
    front, then tensor data is appended in header order, block by block. Closing checks every
    byte arrived and fsyncs."""

    def __init__(self, path, infos, metadata=None):
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for t in infos:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)            # data section 8-byte aligned, as safetensors does
        self.path, self.expected, self.written = path, offset, 0
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, tensor):
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        self.written += data.nbytes

    def close(self):
        self.finish()
        self.sync()

    def finish(self):
        """Check every byte arrived; hand the rest to the page cache."""
        if self.written != self.expected:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes, expected {self.expected}")
        self.file.flush()

    def sync(self):
        """fsync (wait for the disk) and close."""
        os.fsync(self.file.fileno())
        self.file.close()


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _sweep_stale_temps(out):
    """Remove `.NAME.warp-tmp-PID` / `.NAME.warp-old-PID` left by merges that were killed."""
    parent, base = os.path.dirname(out) or ".", os.path.basename(out)
    pattern = re.compile(rf"^\.{re.escape(base)}\.warp-(tmp|old)-(\d+)$")
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if not m or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue                                   # still running: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        stale = os.path.join(parent, entry)
        shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)


def _resolve(p):
    return os.path.realpath(os.path.abspath(p))


def check_output(out, inputs, single_file, overwrite):
    """--out must not be (or contain, or sit inside) an input; an existing --out needs overwrite."""
    out_real = _resolve(out)
    for ckpt in inputs:
        for p in {_resolve(ckpt.path), _resolve(ckpt.root)}:
            if out_real == p or p.startswith(out_real + os.sep) or (
                    not ckpt.single_file and out_real.startswith(p + os.sep)):
                raise CheckpointError(f"--out {out} is (or contains, or is inside) the input "
                                      f"{ckpt.path}; choose a new path")
    if os.path.lexists(out):
        if not overwrite:
            raise CheckpointError(f"--out {out} already exists; pass --overwrite to replace it")
        if os.path.isdir(out) == single_file:
            kind = "a directory" if single_file else "a file"
            raise CheckpointError(f"--out {out} is {kind}, but the output is "
                                  f"{'a single file' if single_file else 'a directory'}; choose another path")
    parent = os.path.dirname(out_real)
    if not os.path.isdir(parent):
        raise CheckpointError(f"--out {out}: parent directory {parent} does not exist")


# ----------------------------------------------------------------------------------------------
# Progress and report.
# ----------------------------------------------------------------------------------------------


class Progress:
    """One line on stderr at most every PROGRESS_EVERY_S seconds, and one at the end."""

    def __init__(self, label, total_tensors, total_bytes, enabled=True):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.enabled, self.tensors, self.bytes = enabled, 0, 0
        self.start = self.last = time.perf_counter()
        self._print()                                  # a line as soon as the pass starts

    def update(self, tensors=0, nbytes=0):
        self.tensors += tensors
        self.bytes += nbytes
        if time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self._print()

    def done(self):
        self._print(final=True)
        return time.perf_counter() - self.start

    def _print(self, final=False):
        now = time.perf_counter()
        self.last = now
        if not self.enabled:
            return
        rate = self.bytes / max(now - self.start, 1e-9)
        eta = f"ETA {(self.total_bytes - self.bytes) / rate:.0f}s" if rate > 0 else "ETA ?"
        tail = f"done in {now - self.start:.1f}s" if final else eta
        print(f"[merge] {self.label}: {self.tensors}/{self.total_tensors} tensors, "
              f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s, {tail}",
              file=sys.stderr, flush=True)


def _peak_rss_mb():
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited from a forking parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


def _tied_notes(init, config):
    """Tied tensors are stored once (safetensors forbids shared storage); say what that means."""
    notes = []
    tie = config.get("tie_word_embeddings", True) if config is not None else None
    has_head = any(n.endswith("lm_head.weight") for n in init.tensors)
    embed = next((n for n in init.tensors if n.endswith("embed_tokens.weight")), None)
    if embed and not has_head and tie is not False:
        notes.append(f"no lm_head.weight: the output projection is tied to {embed} "
                     f"(tie_word_embeddings={tie}), so it is merged with the embeddings")
    elif embed and has_head and tie:
        notes.append("lm_head.weight stored although tie_word_embeddings=true: both copies are "
                     "merged (identical inputs give identical outputs at granularity layer/tensor)")
    return notes


def _group_report(gram, coefs, omegas, fallbacks, method):
    M = gram.shape[0]
    norms = [math.sqrt(max(float(gram[m, m]), 0.0)) for m in range(M)]
    entry = {"norms": norms, "coefficients": [float(c) for c in coefs],
             "lerp_fallback": bool(fallbacks) if method == "slerp" else None}
    if M == 2:
        denom = norms[0] * norms[1]
        cos = float(gram[0, 1]) / denom if denom > 0 else float("nan")
        entry["cos"] = cos
        entry["omega_deg"] = math.degrees(math.acos(max(-1.0, min(1.0, cos)))) if denom > 0 else float("nan")
    elif M > 2:
        entry["cosines"] = {f"{a}-{b}": (float(gram[a, b]) / (norms[a] * norms[b])
                                          if norms[a] * norms[b] > 0 else float("nan"))
                            for a in range(M) for b in range(a + 1, M)}
        entry["sequential_omega_deg"] = [math.degrees(o) for o in omegas]
    return entry


def _print_report(report, max_rows=40):
    groups = report["groups"]
    M = len(report["policies"])
    print(f"merge report: {report['method']} of {M} policies, granularity {report['granularity']}, "
          f"lam {report['lam']}, eta {report['eta']}, {len(groups)} groups, "
          f"{report['params_out']:,} params, LERP fallbacks {report['lerp_fallbacks']}")
    head = "  group" + " " * 38 + ("omega(deg)   |d1|        |d2|        c1       c2" if M == 2
                                    else "norms / coefficients")
    print(head)
    for i, (g, e) in enumerate(groups.items()):
        if i == max_rows:
            print(f"  ... {len(groups) - max_rows} more groups in merge_report.json")
            break
        if M == 2:
            print(f"  {g[:44]:<44} {e['omega_deg']:9.3f}  {e['norms'][0]:10.4g}  {e['norms'][1]:10.4g}"
                  f"  {e['coefficients'][0]:7.4f}  {e['coefficients'][1]:7.4f}"
                  + ("  LERP fallback" if e["lerp_fallback"] else ""))
        else:
            print(f"  {g[:44]:<44} norms {['%.4g' % n for n in e['norms']]} "
                  f"c {['%.4f' % c for c in e['coefficients']]}")
    for note in report["tied"]:
        print(f"  tied: {note}")
    t = report["timings"]
    print(f"  read {report['bytes_read'] / 1e9:.2f} GB, wrote {report['bytes_written'] / 1e9:.2f} GB in "
          f"{t['total_s']:.1f}s (pass 1 {t['pass1_s']:.1f}s, pass 2 {t['pass2_s']:.1f}s; "
          f"{report['held_groups']} groups read once, {report['streamed_groups']} streamed twice), "
          f"peak RSS {report['peak_rss_mb']:.0f} MB; output: {report['out']}")


# ----------------------------------------------------------------------------------------------
# Block kernels: warp_min.tensor_gram and warp_min.combine for the merge's blocks, cheaper.
# ----------------------------------------------------------------------------------------------

# choice: sub-blocks of 2^16 elements. The fp32 working copies of one sub-block (init, M deltas,
# the output: (M + 2) x 256 KB) stay in the 2 MB L2 cache of this machine, and each sub-block
# costs ~10 torch calls of a few us (Python time, holding the GIL).
SUB_ELEMS = 1 << 16
# choice: fp32 dot products over chunks of GRAM_CHUNK elements, summed in float64 (error bound in
# block_gram). Shorter is more precise, but below 128 torch's bmm leaves MKL for a slow loop.
GRAM_CHUNK = 256
# A task vector whose mean square per element is below this (RMS ~1e-15) may lose fp32 products
# to underflow: block_gram hands its block to the float64 reference.
GRAM_FLOOR = 2.0 ** -100
NARROW = (torch.bfloat16, torch.float16)     # 16-bit inputs: exact in fp32, Gram in fp32 chunks


class _Profile:
    """Seconds per stage of the merge, summed over threads (merge_checkpoints(profile=True)):
    wall time, and the thread's CPU time -- on a shared core a thread's wall time also counts
    the others' turns, its CPU time does not (waits on the disk show in wall time only).

    The kernels call `t = prof.lap(stage, t)` after each group of torch calls; _NO_PROFILE's
    methods do nothing, so the timing costs a no-op call when profiling is off."""

    def __init__(self):
        self.seconds, self.cpu_seconds = collections.Counter(), collections.Counter()
        self._lock = threading.Lock()

    @staticmethod
    def now():
        return time.perf_counter(), time.thread_time()

    def lap(self, stage, t0):
        t = self.now()
        with self._lock:
            self.seconds[stage] += t[0] - t0[0]
            self.cpu_seconds[stage] += t[1] - t0[1]
        return t


class _NoProfile:
    @staticmethod
    def now():
        return None

    @staticmethod
    def lap(stage, t0):
        return None


_NO_PROFILE = _NoProfile()


class _Work:
    """One thread's work buffers for a sub-block: X = [init, policy_1 .. policy_M] widened (the
    policies' rows become their deltas in place) and the output, with the views the kernels use
    on a full sub-block made once (each view costs a torch call)."""

    def __init__(self, M, dtype):
        self.X = torch.empty(M + 1, SUB_ELEMS, dtype=dtype)
        self.acc = torch.empty(SUB_ELEMS, dtype=dtype)
        self.full = self._views(SUB_ELEMS)

    def _views(self, length):
        """(X, its rows, the delta rows X[1:], chunk views of X[1:] for the bmm, acc) on the first
        `length` elements; a sub-block shorter than the chunks it spans is padded with zeros."""
        k = -(-length // GRAM_CHUNK)
        padded = self.X[1:, :k * GRAM_CHUNK]
        chunks = padded.view(len(padded), k, GRAM_CHUNK).transpose(0, 1)      # (k, M, b)
        if k * GRAM_CHUNK > length:
            padded[:, length:].zero_()
        X = self.X[:, :length]
        return X, list(X), X[1:], chunks, chunks.transpose(1, 2), self.acc[:length]

    def views(self, length):
        return self.full if length == SUB_ELEMS else self._views(length)


class _Scratch(threading.local):
    """Per-thread work buffers, allocated once (fresh ones would be fresh pages, faulted in and
    zeroed for every block)."""

    def get(self, M, dtype):
        if not hasattr(self, "work"):
            self.work = {}
        if (M, dtype) not in self.work:
            self.work[M, dtype] = _Work(M, dtype)
        return self.work[M, dtype]


_scratch = _Scratch()


def _sub_blocks(init, policies, work_dtype, prof):
    """Yield the sub-blocks of a block widened to the work dtype: (the _Work views, index, time).
    bf16 and f16 -> fp32 is exact, and so is fp32 -> float64."""
    w = _scratch.get(len(policies), work_dtype)
    for i, pieces in enumerate(zip(*(x.reshape(-1).split(SUB_ELEMS) for x in [init, *policies]))):
        t = prof.now()
        views = w.views(pieces[0].numel())
        for row, piece in zip(views[1], pieces):
            row.copy_(piece)
        yield views, i, prof.lap("widen", t)


def block_gram(init, policies, prof=_NO_PROFILE):
    """G[a, b] = <delta_a, delta_b> of one block's task vectors, in float64: the value of
    warp_min.tensor_gram (the reference: used as is for float64 inputs, and as the fallback), at
    a fraction of its cost -- it widens every input to float64, which moves 4x the bytes of bf16.

    Here the inputs are widened a sub-block at a time (cache-resident), and
    - bf16/f16 inputs: the deltas formed in fp32 -- exact for bf16 unless the exponents of the two
      operands differ by more than 16 (the difference then needs more than 24 bits) -- their
      products summed in fp32 over chunks of b = GRAM_CHUNK elements (one bmm per sub-block), the
      chunk sums of the block summed in float64 (one call);
    - fp32 inputs: tensor_gram's own arithmetic (deltas, products and sums in float64), only
      cache-blocked.

    Error bound. u = 2^-24 (fp32), u' = 2^-53 (float64), gamma_k = k u / (1 - k u), gamma'_k the
    same with u'; S_ab = sum_i |delta_a,i delta_b,i| <= |delta_a| |delta_b| (Cauchy-Schwarz).
    (1) A delta in the work dtype is fl(p - theta) = delta (1 + e), |e| <= u (resp. u'); e = 0
        unless the exponents of p and theta differ by more than 16 (resp. 29).
    (2) bf16/f16: an fp32 dot product of b terms, in any summation order, with or without FMA, is
        within gamma_b sum |x_i y_i| of the exact value (Higham, Accuracy and Stability of
        Numerical Algorithms, 2nd ed., sec. 3.1); with (1): (1 + u)^2 (1 + gamma_b) <= 1 +
        gamma_{b+2}. IEEE gradual underflow adds at most 2^-150 per operation (2b - 1 of them
        per chunk, zero padding adds nothing): at most n 2^-149 in all.
    (3) The float64 sums -- the chunk sums (or products) of a block, then the blocks and tensors
        into the group, L terms deep at most -- add gamma'_L times the magnitudes summed.
    Hence, for the Gram Ĝ of a group of n elements, with L <= n / GRAM_CHUNK (resp. n) + the
    number of blocks and tensors in the group -- gamma'_L < 2e-7 up to 10^9 elements:
        bf16/f16: |Ĝ_ab - G_ab| <= (gamma_{b+2} + gamma'_L (1 + gamma_{b+2})) S_ab + n 2^-149
                                   ~= 1.54e-5 S_ab + n 2^-149            (b = 256)
        fp32:     |Ĝ_ab - G_ab| <= gamma'_{L+3} S_ab                     (as tensor_gram)
    The absolute term only matters for tiny task vectors: a block whose fp32 Gram is not finite
    (overflow: |delta| above ~1e19) or holds a task vector with mean square below GRAM_FLOOR per
    element (there n 2^-149 could exceed 2^-49 |delta_a| |delta_b|) -- unless that task vector is
    exactly zero, whose products are exact zeros -- is recomputed by the reference.
    For the merge (16-bit inputs): cos(Omega) moves by at most ~2 x 1.54e-5, and the SLERP
    coefficients by as much times |dc/dcos|, which is O(1) except for nearly opposite task
    vectors: ~1e-5 relative, far below a bf16 ulp (2^-8 = 3.9e-3). tests/test_merge_gram.py
    checks the bound and the merged outputs on adversarial inputs.
    """
    narrow = init.dtype in NARROW
    if not (narrow or init.dtype == torch.float32):
        return warp_min.tensor_gram(init, policies)
    M, n_subs = len(policies), -(-init.numel() // SUB_ELEMS)
    # the fp32 chunk sums (resp. float64 sub-block Grams) of the whole block, summed at the end
    partials = torch.zeros(n_subs, SUB_ELEMS // GRAM_CHUNK if narrow else 1, M, M,
                           dtype=torch.float32 if narrow else torch.float64)
    for (X, rows, deltas, chunks, chunks_t, _), i, t in _sub_blocks(
            init, policies, torch.float32 if narrow else torch.float64, prof):
        deltas.sub_(rows[0])                                # one call for all M (broadcast)
        t = prof.lap("delta", t)
        if narrow:
            torch.bmm(chunks, chunks_t, out=partials[i, :len(chunks)])
        else:
            torch.mm(deltas, deltas.T, out=partials[i, 0])
        t = prof.lap("gram", t)
    t = prof.now()
    gram = partials.sum((0, 1), dtype=torch.float64)
    t = prof.lap("gram", t)
    if not torch.isfinite(gram).all() or (narrow and any(
            0 < d < init.numel() * GRAM_FLOOR or (d == 0 and not torch.equal(p, init))
            for d, p in zip(gram.diagonal().tolist(), policies))):
        gram = warp_min.tensor_gram(init, policies)          # rare: see the bound above
        prof.lap("gram (float64 fallback)", t)
    return gram


def block_combine(init, policies, coefficients, prof=_NO_PROFILE):
    """theta_init + sum_m c_m delta_m for one block, in its dtype: bit for bit warp_min.combine
    (the same fp32 operations in the same order: widen, subtract, add with alpha c_m, round once
    to the output dtype), a sub-block at a time in per-thread buffers instead of 3 + 2M fresh
    block-sized temporaries; float64 inputs go to warp_min.combine itself. Returns (output,
    whether it is all finite) -- checked a sub-block at a time, while in cache."""
    if not (init.dtype in NARROW or init.dtype == torch.float32):
        out = warp_min.combine(init, policies, coefficients)
        return out, _all_finite(out)
    out, finite, cs = torch.empty(init.shape, dtype=init.dtype), True, coefficients.tolist()
    pieces = out.reshape(-1).split(SUB_ELEMS)
    for (X, rows, deltas, _, _, acc), i, t in _sub_blocks(init, policies, torch.float32, prof):
        if init.dtype == torch.float32:
            acc = pieces[i]                                 # fp32 out: no rounding left to do
        deltas.sub_(rows[0])
        t = prof.lap("delta", t)
        torch.add(rows[0], deltas[0], alpha=cs[0], out=acc)
        for c, row in zip(cs[1:], rows[2:]):
            acc.add_(row, alpha=c)
        t = prof.lap("combine", t)
        if acc is not pieces[i]:
            pieces[i].copy_(acc)                            # fp32 -> bf16/f16: the one rounding
            t = prof.lap("narrow", t)
        finite = finite and _piece_finite(pieces[i], acc)
        prof.lap("finite check", t)
    return out, finite


def _piece_finite(piece, acc):
    """Is `piece` (= `acc`, fp32, narrowed to the output dtype) all finite? sum acc^2 is finite
    unless some |acc_i| exceeds ~1.8e19 or is not finite: then, and for f16 (which overflows at
    65504), the output itself is checked. A dot product is the cheapest full reduction here."""
    if piece.dtype != torch.float16 and math.isfinite(float(torch.dot(acc, acc))):
        return True
    return _all_finite(piece)


# ----------------------------------------------------------------------------------------------
# The merge.
# ----------------------------------------------------------------------------------------------


def memory_available():
    """Bytes of memory available now (Linux: MemAvailable, which counts reclaimable page cache);
    None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_group_budget(input_bytes):
    """--max-group-mb when not given: "auto" if the inputs do not fit in the memory available, so
    that a second pass would read them from the disk again (bench/merge.py --cold
    --evict-between-passes: ~20% faster held); else 0, streaming: with the inputs in the page
    cache, holding saves no time and doubles the RSS."""
    available = memory_available()
    return "auto" if available is not None and input_bytes > available else 0


def _validate_values(n_policies, lam, eta, granularity, method, allow_extrapolation, workers=None,
                     max_group_mb=None):
    if n_policies < 1:
        raise CheckpointError("--policies needs at least one checkpoint (WARP merges M >= 2)")
    if lam is not None:
        if not 0.0 <= lam <= 1.0:
            raise CheckpointError(f"--lam {lam} is outside [0, 1]")
        if n_policies != 2:
            raise CheckpointError(f"--lam is defined for M = 2 policies only (got M = {n_policies}; "
                                  f"M > 2 merges sequentially with lam = 1/m)")
    if eta is not None and not (0.0 <= eta <= 1.0 or (allow_extrapolation and eta > 1.0)):
        hint = "" if eta < 0 else "; pass --allow-extrapolation to go beyond the merged model"
        raise CheckpointError(f"--eta {eta} is outside [0, 1]{hint}")
    if granularity not in ("layer", "tensor", "model"):
        raise CheckpointError(f"--granularity {granularity!r}: choose layer, tensor or model")
    if workers is not None and workers < 1:
        raise CheckpointError(f"--workers {workers}: needs at least 1")
    if method not in ("slerp", "lerp"):
        raise CheckpointError(f"--method {method!r}: choose slerp or lerp")
    if max_group_mb not in ("auto", None) and not (
            isinstance(max_group_mb, (int, float)) and max_group_mb >= 0):
        raise CheckpointError(f"--max-group-mb {max_group_mb}: needs a number >= 0 (MiB; 0 = stream "
                              f"every group) or auto")


def _all_finite(tensor):
    """A sum is finite only if every term is: one cheap reduction. If it is not (a nan/inf, or a
    sum that overflowed), min and max -- which propagate nan and +-inf -- decide."""
    if tensor.numel() == 0 or math.isfinite(float(tensor.sum())):
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _retain_freed_memory():
    """Keep glibc from handing every freed block back to the OS.

    Each block allocates a few temporaries of a few MB (inside tensor_gram and combine). By
    default glibc serves those with mmap and returns them with munmap on free, so every block
    pays fresh page faults and zeroing -- measured 3x the arithmetic itself. Raising the mmap and
    trim thresholds (process-wide; it only keeps a few blocks' worth of memory around) makes
    them reuse the heap. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)       # glibc's maximum on 64-bit
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


class _Workers:
    """`n` worker threads for the whole merge; map() runs fn over jobs on them, in order.

    torch releases the GIL inside its kernels, so single-threaded torch ops on separate blocks
    run in parallel. One set of threads serves every pass (and the loading of held groups, which
    happens while a write is in flight): glibc gives each thread its own heap, so stable threads
    reuse the freed blocks instead of growing -- and page-faulting -- new heaps.
    """

    def __init__(self, n):
        self.n = n
        self.pool = concurrent.futures.ThreadPoolExecutor(n) if n > 1 else None

    def map(self, fn, jobs):
        """map(fn, jobs), results in job order, at most 2 * n in flight (memory: a few blocks)."""
        if self.pool is None:
            yield from map(fn, jobs)
            return
        pending = collections.deque()
        try:
            for job in jobs:
                pending.append(self.pool.submit(fn, job))
                if len(pending) >= 2 * self.n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            concurrent.futures.wait(pending)          # nothing of this map still running

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _find_nonfinite(checkpoints, name, block_elems):
    """Name the input holding a non-finite value in tensor `name` (slow path, only on failure)."""
    for ckpt in checkpoints:
        for block in ckpt.blocks(name, block_elems):
            if not _all_finite(block):
                return ckpt.path
    return None


def _group_grams(inputs, names, granularity, block_elems, workers, prog, cache=None,
                 prof=_NO_PROFILE):
    """{group: float64 Gram matrix of its task vectors} over the tensors `names`, block by block.

    Sums in a fixed order -- each tensor's blocks in order from zero, then the tensors into their
    group in the order of `names` -- so the result does not depend on the number of threads, nor
    on whether it is pass 1 or the loading of a held group. With `cache` (a dict), the blocks
    read are kept there (mapped, not released), cache[name] = [[init block, policy blocks...] per
    block], for pass 2.
    """
    M = len(inputs) - 1

    def gram_job(job):
        name, start, rows = job
        t = prof.now()
        blocks = [ck.view(name, start, rows) for ck in inputs]
        prof.lap("read", t)
        gram = block_gram(blocks[0], blocks[1:], prof)
        nbytes = sum(b.nbytes for b in blocks)
        if cache is None:
            t = prof.now()
            del blocks
            for ck in inputs:
                ck.release(name, start, rows)
            prof.lap("release", t)
            blocks = None
        return name, blocks, gram, nbytes

    cuts = {n: inputs[0].block_rows(n, block_elems) for n in names}
    jobs = [(n, start, rows) for n in names for start, rows in cuts[n]]
    grams = {warp_min.group_of(n, granularity): torch.zeros(M, M, dtype=torch.float64) for n in names}
    tensor_grams = {n: torch.zeros(M, M, dtype=torch.float64) for n in names}
    blocks_left = {n: len(cuts[n]) for n in names}
    for name, blocks, gram, nbytes in workers.map(gram_job, jobs):     # fixed order
        tensor_grams[name] += gram
        if cache is not None:
            cache.setdefault(name, []).append(blocks)
        prog.update(nbytes=nbytes)
        blocks_left[name] -= 1
        if blocks_left[name]:
            continue
        if not torch.isfinite(tensor_grams[name]).all():
            culprit = _find_nonfinite(inputs, name, block_elems)
            if culprit is None:
                raise CheckpointError(f"tensor {name}: task-vector norm overflows float64")
            raise CheckpointError(f"{culprit}: non-finite values (nan/inf) in tensor {name}")
        grams[warp_min.group_of(name, granularity)] += tensor_grams.pop(name)
        if cache is None:
            prog.update(tensors=1)                          # pass 2 counts tensors when written
    return grams


def _plan_held_groups(init_ck, mergeable, granularity, M, budget):
    """Which groups are read once and held in memory; returns (held groups, peak bytes held).

    Walks the tensors in output order (the init's files, on-disk order). A group is held if its
    raw bytes in all M + 1 inputs fit in what the budget has left when its first tensor comes up;
    its tensors give their bytes back as they are written. Every other group is streamed (two
    passes). Deterministic, so --dry-run shows the same plan.
    """
    nbytes = {n: (M + 1) * init_ck.tensors[n].nbytes for n in mergeable}
    group_bytes = collections.Counter()
    for n in mergeable:
        group_bytes[warp_min.group_of(n, granularity)] += nbytes[n]
    held, seen, resident, peak = set(), set(), 0, 0
    for n in mergeable:                                  # names are in output order
        g = warp_min.group_of(n, granularity)
        if g not in seen:
            seen.add(g)
            if resident + group_bytes[g] <= budget:
                held.add(g)
                resident += group_bytes[g]
                peak = max(peak, resident)
        if g in held:
            resident -= nbytes[n]
    return held, peak


def _write_merged(tmp, single, inputs, coefs, copied, granularity, eta, block_elems, workers, prog,
                  load_group, prof=_NO_PROFILE):
    """Pass 2: every shard of the init: init + sum_m c_m delta_m, then LITI. Returns bytes written.

    Blocks of held groups come from the cache load_group(g) fills (returned: {name: blocks});
    it is called when the group's first tensor comes up, and sets coefs[g]. The others are read.
    """
    init_ck, M, written, cache = inputs[0], len(inputs) - 1, 0, {}

    def merged_block(job):
        name, start, rows, last, blocks = job
        t = prof.now()
        if name in copied:                                  # choice: non-float buffers copied
            block = init_ck.read(name, start, rows)
            prof.lap("read", t)
            return block, block.nbytes * (M + 2), last
        if blocks is None:
            blocks = [ck.view(name, start, rows) for ck in inputs]
            t = prof.lap("read", t)
        coefficients = coefs[warp_min.group_of(name, granularity)]
        if eta is not None:
            # LITI folded into the coefficients: (1 - eta) init + eta (init + sum c delta)
            # = init + sum (eta c) delta -- the same map as warp_min.liti(init, merged, eta), with
            # one rounding to the output dtype instead of two (bf16 merged, then bf16 LITI).
            coefficients = eta * coefficients
        merged, finite = block_combine(blocks[0], blocks[1:], coefficients, prof)
        if not finite:
            raise CheckpointError(f"tensor {name}: the merge produced {int((~torch.isfinite(merged)).sum())} "
                                  f"non-finite values (overflow in {init_ck.tensors[name].dtype}?)")
        t = prof.now()
        nbytes = merged.nbytes + sum(b.nbytes for b in blocks)
        del blocks
        for ck in inputs:
            ck.release(name, start, rows)
        prof.lap("release", t)
        return merged, nbytes, last

    def jobs(file_names):
        for n in file_names:
            cuts = init_ck.block_rows(n, block_elems)
            held = None
            if n not in copied:
                g = warp_min.group_of(n, granularity)
                if g not in coefs:                          # a held group's first tensor: load it
                    cache.update(load_group(g))
                held = cache.pop(n, None)
            for i, (start, rows) in enumerate(cuts):
                yield n, start, rows, i == len(cuts) - 1, None if held is None else held[i]

    with _BackgroundWrites(prof) as background:
        for file, file_names in init_ck.files_in_order().items():
            path = tmp if single else os.path.join(tmp, file)
            writer = ShardWriter(path, [init_ck.tensors[n] for n in file_names], init_ck.metadata)
            for block, nbytes, last in workers.map(merged_block, jobs(file_names)):
                background.put(writer.write, block)         # in header order
                prog.update(tensors=int(last), nbytes=nbytes)
            background.close_shard(writer)
            written += writer.expected
    return written


class _BackgroundWrites:
    """Runs writes on one thread, in order, while the caller goes on merging; at most
    WRITE_QUEUE_BLOCKS blocks wait. Writing to the page cache costs about a third of the
    arithmetic: on a second core it does not stall the workers. The fsync of each finished shard
    runs on a third thread: it waits for the disk (~0.1 s per 250 MB shard), which would
    otherwise stop the writes, then fill the queue and stall the workers. Leaving the `with`
    waits for every write and fsync; the first error is raised in the caller."""

    def __init__(self, prof=_NO_PROFILE):
        self.queue, self.error, self.prof = queue.Queue(WRITE_QUEUE_BLOCKS), None, prof
        self.syncs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="merge-fsync")
        self.synced = []
        self.thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            fn, args = item
            if self.error is None:                      # after an error: drain, do nothing
                try:
                    t = self.prof.now()
                    fn(*args)
                    self.prof.lap(f"writer thread: {getattr(fn, '__name__', 'call')}", t)
                except BaseException as e:              # noqa: BLE001 -- re-raised by the caller
                    self.error = e

    def put(self, fn, *args):
        """Run fn(*args) after everything put before."""
        self._check()
        self.queue.put((fn, args))

    def close_shard(self, writer):
        """After the shard's last write: finish it, then fsync it on the fsync thread."""
        self.put(writer.finish)
        self.put(self._sync_later, writer)

    def _sync_later(self, writer):
        self.synced.append(self.syncs.submit(self._timed_sync, writer))

    def _timed_sync(self, writer):
        t = self.prof.now()
        writer.sync()
        self.prof.lap("fsync thread: fsync", t)

    def _check(self):
        if self.error is not None:
            raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.queue.put(None)
        self.thread.join()
        self.syncs.shutdown(wait=True)
        for future in self.synced:
            if self.error is None and future.exception() is not None:
                self.error = future.exception()
        if exc[0] is None:
            self._check()


def merge_checkpoints(init, policies, out, lam=None, eta=None, granularity="layer", method="slerp",
                      dry_run=False, overwrite=False, progress=True, allow_extrapolation=False,
                      block_elems=BLOCK_ELEMS, workers=None, max_group_mb=None, profile=False):
    """Merge checkpoints on disk: out = init + sum_m c_m (policy_m - init) per group, then LITI.

    init, policies: paths (HF directories or .safetensors files); out: path to create.
    lam: SLERP/LERP weight of the second policy (M = 2; None = 0.5); eta: LITI
    (1 - eta) * init + eta * merged, None = no LITI. granularity: layer (paper), tensor (mergekit's
    nuslerp) or model. workers: threads working on different blocks (default: CPU count, max 4).
    max_group_mb: memory (MiB) for groups read once and held between their Gram and their write (raw
    bytes of all inputs); other groups are streamed in two passes. 0 streams everything; "auto" =
    min(2 GiB, what keeps peak memory under 2 x the largest tensor in float64); None (default) =
    "auto" if the inputs are larger than the memory available now, else 0 (default_group_budget).
    The output is the same bytes either way. profile: time each stage of the block pipeline (reads,
    widening to fp32, deltas, Gram, combine, narrowing, writes...), summed over threads, into
    report["profile_s"] (wall) and report["profile_cpu_s"] (thread CPU time);
    experiments/bench/merge.py --profile prints them.
    Returns the merge report (also written as merge_report.json).
    """
    # choice: parallelism across blocks (Python threads, each running torch single-threaded),
    # not inside them: on ~256k-element elementwise ops OpenMP's fork/join costs more than the
    # second core gains (2 intra-op threads measured 1.9x slower on a busy 2-core machine).
    _validate_values(len(policies), lam, eta, granularity, method, allow_extrapolation, workers,
                     max_group_mb)
    workers = workers or min(4, os.cpu_count() or 1)
    _retain_freed_memory()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opened, pool = [], _Workers(workers)
    try:
        return _merge_checkpoints(init, policies, out, lam, eta, granularity, method, dry_run,
                                  overwrite, progress, allow_extrapolation, block_elems, pool,
                                  max_group_mb, opened, _Profile() if profile else _NO_PROFILE)
    finally:
        pool.close()
        torch.set_num_threads(previous_threads)
        for ckpt in opened:
            ckpt.close()


def _merge_checkpoints(init, policies, out, lam, eta, granularity, method, dry_run, overwrite,
                       progress, allow_extrapolation, block_elems, workers, max_group_mb, opened,
                       prof):
    t0 = time.perf_counter()
    out = out.rstrip(os.sep) or out
    _validate_values(len(policies), lam, eta, granularity, method, allow_extrapolation)
    init_ck = Checkpoint(init)
    pol_cks = [Checkpoint(p) for p in policies]
    inputs = [init_ck] + pol_cks
    opened.extend(inputs)                               # closed by merge_checkpoints
    check_compatible(init_ck, pol_cks)
    check_output(out, inputs, init_ck.single_file, overwrite)

    names = list(init_ck.tensors)                       # on-disk order of the init
    mergeable = [n for n in names if init_ck.tensors[n].dtype in MERGEABLE]
    copied = [n for n in names if init_ck.tensors[n].dtype not in MERGEABLE]
    groups = {}
    for n in mergeable:
        groups.setdefault(warp_min.group_of(n, granularity), []).append(n)
    in_bytes = init_ck.nbytes
    M = len(policies)
    config_path = os.path.join(init_ck.root, "config.json")
    config = None
    if not init_ck.single_file and os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)

    largest = max((init_ck.tensors[n] for n in names), key=lambda t: t.numel)
    block = min(block_elems, max(largest.numel, 1))
    itemsize = max(DTYPE_BYTES[init_ck.tensors[n].dtype] for n in names)
    # per busy worker: the mapped pages of M + 1 input blocks and its sub-block work buffers
    # (_Work: M + 2 rows, fp32 -- and float64 for the Gram of fp32 inputs); plus finished output
    # blocks: up to 2 * workers in flight and WRITE_QUEUE_BLOCKS waiting for the writer thread
    est_peak = (workers.n * (block * (M + 1) * itemsize + (M + 2) * SUB_ELEMS * (4 + 8))
                + (2 * workers.n + WRITE_QUEUE_BLOCKS) * block * itemsize)
    # Held groups: their raw blocks stay in memory between the Gram and the write. The default
    # budget keeps buffers + held bytes under 2 x the largest tensor in float64 (the memory goal).
    if max_group_mb is None:            # the default: hold only if the second pass would hit the disk
        max_group_mb = default_group_budget((M + 1) * in_bytes)
        chosen = f"{max_group_mb} (default)"
    else:
        chosen = max_group_mb
    if max_group_mb == "auto":
        budget = max(0, min(MAX_GROUP_BYTES, 2 * 8 * largest.numel - est_peak))
    else:
        budget = int(max_group_mb * 2**20)
    held, held_peak = _plan_held_groups(init_ck, mergeable, granularity, M, budget)
    streamed = [n for n in mergeable if warp_min.group_of(n, granularity) not in held]
    streamed_bytes = sum(init_ck.tensors[n].nbytes for n in streamed)
    bytes_read = (M + 1) * (in_bytes + streamed_bytes)
    plan = {"tensors": len(names), "groups": len(groups), "policies": M,
            "held_groups": len(held), "streamed_groups": len(groups) - len(held),
            "group_budget_mb": budget / 2**20,
            "max_group_mb": chosen,
            "bytes_read": bytes_read, "bytes_written": in_bytes,
            "largest_tensor": f"{largest.name} {list(largest.shape)} {largest.dtype}",
            "est_peak_working_mb": (est_peak + held_peak) / 2**20}
    if dry_run:
        print(f"dry run: {plan['tensors']} tensors in {len(init_ck.files)} file(s), {plan['groups']} "
              f"groups (granularity {granularity}), {method} of {M} policies; {len(held)} groups "
              f"read once and held (budget {budget / 2**20:.0f} MB), {len(groups) - len(held)} "
              f"streamed in 2 passes; would read {bytes_read / 1e9:.2f} GB from {M + 1} "
              f"checkpoints, write {plan['bytes_written'] / 1e9:.2f} GB to {out}; estimated peak "
              f"memory {(est_peak + held_peak) / 2**20:.0f} MB of buffers ({workers.n} workers, "
              f"{held_peak / 2**20:.0f} MB of held groups) + the Python/torch process "
              f"(largest tensor {plan['largest_tensor']}); nothing written")
        return {"dry_run": True, **plan}

    _sweep_stale_temps(out)
    t_validated = time.perf_counter()

    coefs, group_entries, fallback_counts = {}, {}, {}

    def set_coefficients(grams):
        for g, gram in grams.items():
            c, omegas, fallbacks = warp_min.merge_coefficients(gram, lam, method)
            coefs[g], fallback_counts[g] = c, fallbacks
            group_entries[g] = {"tensors": len(groups[g]),
                                "params": sum(init_ck.tensors[n].numel for n in groups[g]),
                                **_group_report(gram, c, omegas, fallbacks, method)}

    # Pass 1 (streamed groups only): per-group Gram matrices of the task vectors, float64.
    t_pass1 = 0.0
    if streamed:
        prog = Progress("pass 1/2 (angles of streamed groups)", len(streamed),
                        (M + 1) * streamed_bytes, progress)
        set_coefficients(_group_grams(inputs, streamed, granularity, block_elems, workers, prog,
                                      prof=prof))
        t_pass1 = prog.done()

    # Pass 2: write init + sum_m c_m delta_m (then LITI) into a hidden temporary beside --out.
    parent, base = os.path.dirname(_resolve(out)), os.path.basename(_resolve(out))
    tmp = os.path.join(parent, f".{base}.warp-tmp-{os.getpid()}")
    single = init_ck.single_file
    report_path = (os.path.splitext(out)[0] + ".merge_report.json" if single
                   else os.path.join(out, "merge_report.json"))
    try:
        if not single:
            os.makedirs(tmp)
        prog = Progress("pass 2/2 (write)" if streamed else "single pass (angles + write)",
                        len(names), (M + 1) * in_bytes * 2 + in_bytes, progress)

        def load_group(g):                              # a held group: read once, Gram, keep blocks
            cache = {}
            set_coefficients(_group_grams(inputs, groups[g], granularity, block_elems, workers,
                                          prog, cache, prof))
            return cache

        written = _write_merged(tmp, single, inputs, coefs, set(copied), granularity, eta,
                                block_elems, workers, prog, load_group, prof)
        t_pass2 = prog.done()
        group_entries = {g: group_entries[g] for g in groups}    # report in model order
        n_fallbacks = sum(fallback_counts.values())

        copied_files = []
        if not single:
            if init_ck.index is not None:
                index = json.loads(json.dumps(init_ck.index))
                index.setdefault("metadata", {})["total_size"] = written
                _write_json(os.path.join(tmp, INDEX_NAME), index)
            for side in SIDE_FILES:
                src = os.path.join(init_ck.root, side)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, side))
                    _fsync_path(os.path.join(tmp, side))
                    copied_files.append(side)

        params = sum(init_ck.tensors[n].numel for n in names)
        report = {
            "init": init, "policies": list(policies), "out": out, "method": method,
            "granularity": granularity, "lam": 0.5 if lam is None and M == 2 else lam, "eta": eta,
            "params_in": params, "params_out": params, "tensors": len(names),
            "bytes_read": bytes_read, "bytes_written": written,
            "held_groups": len(held), "streamed_groups": len(groups) - len(held),
            "group_budget_mb": budget / 2**20,
            "max_group_mb": chosen,
            "lerp_fallbacks": n_fallbacks,
            "nonfinite": {"inputs_checked": True, "input_nonfinite": 0,
                          "outputs_checked": True, "output_nonfinite": 0},
            "copied_from_init_unmerged": copied, "copied_files": copied_files,
            "tied": _tied_notes(init_ck, config),
            "groups": group_entries,
        }
        report["timings"] = {"validate_s": t_validated - t0, "pass1_s": t_pass1, "pass2_s": t_pass2,
                             "total_s": time.perf_counter() - t0}
        report["peak_rss_mb"] = _peak_rss_mb()
        if isinstance(prof, _Profile):
            report["profile_s"] = dict(prof.seconds.most_common())
            report["profile_cpu_s"] = dict(prof.cpu_seconds.most_common())
        if not single:
            _write_json(os.path.join(tmp, "merge_report.json"), report)
            _fsync_path(tmp)

        # Only now does --out appear (or change): a complete output, renamed in one step.
        if os.path.lexists(out):
            if single:
                os.replace(tmp, out)                   # atomic for files
            else:
                old = os.path.join(parent, f".{base}.warp-old-{os.getpid()}")
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        _fsync_path(parent)
        if single:
            _write_json(report_path, report)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    if progress:
        _print_report(report)
    return report


# ----------------------------------------------------------------------------------------------
# CLI: warp-min-merge ... (= python warp_min.py merge ... = python -m warp_scale.merge ...)
# ----------------------------------------------------------------------------------------------


def _group_budget(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB or auto") from None


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise CheckpointError(message)


def build_parser():
    p = _OneLineParser(
        prog="warp-min-merge", allow_abbrev=False,
        description="Merge RL policies fine-tuned from the same init: SLERP of task vectors "
                    "(WARP, arXiv 2406.16768), optionally followed by LITI towards the init. "
                    "Streams safetensors checkpoints of any size; the output mirrors the init's "
                    "shard layout, dtypes and config/tokenizer files.")
    p.add_argument("--init", required=True, help="the init (e.g. SFT) checkpoint: HF directory "
                   "with model.safetensors or shards + index, or one .safetensors file")
    p.add_argument("--policies", required=True, nargs="+", metavar="CKPT",
                   help="the fine-tuned policies (same tensor names/shapes/dtypes as --init); "
                        "M > 2 merges sequentially with lam = 1/m (order matters for SLERP)")
    p.add_argument("--out", required=True, help="output directory (or .safetensors file for a "
                   "single-file init); must not exist unless --overwrite")
    p.add_argument("--lam", type=float, default=None,
                   help="interpolation weight of the second policy, in [0, 1] (M = 2 only; default 0.5)")
    p.add_argument("--eta", type=float, default=None,
                   help="LITI: (1 - eta) * init + eta * merged, in [0, 1] (default: no LITI, i.e. 1); "
                        "paper: 0.3 between iterations")
    p.add_argument("--allow-extrapolation", action="store_true", help="allow --eta > 1")
    p.add_argument("--granularity", default="layer", choices=["layer", "tensor", "model"],
                   help="one angle per transformer block (paper, default), per tensor (mergekit "
                        "nuslerp) or for the whole model")
    p.add_argument("--method", default="slerp", choices=["slerp", "lerp"], help="default slerp")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (only once the new output is complete)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads working on different blocks (default: number of CPUs, at most 4)")
    p.add_argument("--max-group-mb", type=_group_budget, default=None, metavar="MB",
                   help="read groups (e.g. transformer blocks) of up to MB MiB in all inputs once "
                        "and hold them between their angle and their write, instead of reading "
                        "every input twice: halves the reading when the inputs are not in the page "
                        "cache; 'auto' = min(2048, 2 x the largest tensor in float64 - working "
                        "buffers); 0 = stream everything. Default: auto if the inputs are larger "
                        "than the memory available now, else 0. The output is the same either way")
    p.add_argument("--quiet", action="store_true", help="no progress lines or report table")
    return p


def main(argv=None):
    """`warp-min-merge ...` (= `python warp_min.py merge ...`); returns the exit status (2 = user error)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        merge_checkpoints(args.init, args.policies, args.out, lam=args.lam, eta=args.eta,
                          granularity=args.granularity, method=args.method, dry_run=args.dry_run,
                          overwrite=args.overwrite, progress=not args.quiet,
                          allow_extrapolation=args.allow_extrapolation, workers=args.workers,
                          max_group_mb=args.max_group_mb)
    except CheckpointError as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:                            # --help
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
