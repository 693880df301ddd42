"""Safetensors files and ptqtp directories on disk, at the file level: atomic streaming writes, the one tensor
reader, headers, metadata, the names of the files a ptqtp directory holds, atomic JSON, and validation.

Imports only `errors`, `format` and `config`; never transformers. What goes into an output directory, and
when, is `writer`'s business; this module only writes and reads files safely.

Shards are written by `ShardWriter`: the header is computed up front from the planned tensor list, so tensors
stream into the file one at a time (peak memory is one tensor, not one shard) and the bytes depend only on
the plan and the tensor values, never on timing or dict order. A shard appears under its final name only
when complete (temp name, fsync, `os.replace`). Reading goes through `read_header`, which checks a file's
structure and names the file in every error, and `read_tensor` (plain file I/O, whole tensors or row ranges,
no mmap), so truncation or corruption never surfaces as a crash deep inside safetensors.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pathlib
import re
from dataclasses import dataclass, field

import torch

from . import format as fmt
from .config import TritPlaneConfig
from .errors import (CorruptCheckpointError, DiskFullError, FormatVersionError, OutputNotWritableError,
                     UnsupportedCheckpointError)

SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
REPORT_NAME = "ptqtp_report.json"  # what `ptqtp quantize` measured (per-tensor error, sizes, time); read by info, eval
TMP_MARK = ".ptqtp-tmp"  # files holding this in their name are incomplete writes

# torch dtype <-> safetensors dtype tag
_DTYPE_TAGS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_TAG_DTYPES = {v: k for k, v in _DTYPE_TAGS.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def dtype_tag(dtype: torch.dtype) -> str:
    return _DTYPE_TAGS[dtype]


def tag_dtype(tag: str) -> torch.dtype:
    return _TAG_DTYPES[tag]


def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def scale_name(weight_name: str) -> str:
    """Name of the scales beside a packed tensor: `X.weight` -> `X.weight_scale`; a fused expert `P` -> `P_scale`."""
    if weight_name.endswith("." + fmt.WEIGHT_SUFFIX):
        return weight_name[: -len(fmt.WEIGHT_SUFFIX)] + fmt.SCALE_SUFFIX
    return weight_name + "_scale"


def ptqtp_metadata() -> dict[str, str]:
    """Safetensors `__metadata__` of every shard ptqtp writes."""
    return {fmt.META_FORMAT: "pt", fmt.META_QUANT_METHOD: fmt.QUANT_METHOD,
            fmt.META_FORMAT_VERSION: str(fmt.FORMAT_VERSION)}


def _disk_full(path, e: OSError) -> DiskFullError:
    return DiskFullError(f"no space left on the device while writing {path}; free some space (or choose another -o "
                         "directory) and rerun with --resume.")


def raise_write_error(path, e: OSError):
    """An OSError while writing `path`, as the one-line error users can act on (full disk, read-only output)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise _disk_full(path, e) from None
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise OutputNotWritableError(f"cannot write {path} ({e.strerror}); the output folder is read-only or not "
                                     "yours: choose another -o directory.") from None
    if e.errno == errno.ENOTDIR:
        raise OutputNotWritableError(f"cannot write {path}: part of that path is a file, not a folder; choose "
                                     "another -o directory.") from None
    if e.errno == errno.EFBIG:
        raise OutputNotWritableError(f"cannot write {path}: the file grows past what this filesystem or the "
                                     "file-size limit (ulimit -f) allows; raise the limit, or pass a smaller "
                                     "--max-shard-size.") from None
    raise e


def make_dirs(path) -> None:
    """`mkdir -p` for an output folder; a read-only or full parent is a one-line error."""
    try:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise_write_error(path, e)


def tmp_path_for(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}{TMP_MARK}-{os.getpid()}")


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` under a temp name, fsync, rename; ENOSPC becomes `DiskFullError`."""
    path = pathlib.Path(path)
    tmp = tmp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included: no temp file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise_write_error(path, e)
        raise


def atomic_write_json(path, obj, *, sort_keys: bool = True) -> None:
    """JSON, indented, with a trailing newline, written atomically (`atomic_write_bytes`). Sorted keys (the
    default) make equal content give equal bytes; `sort_keys=False` keeps a record's own order for readers."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as planned or as found in a file header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class ShardWriter:
    """Streams the planned tensors of one shard into `path`, in plan order, then renames it into place.

    Usage: `with ShardWriter(path, specs, metadata) as w: for t in ...: w.write(name, t)`. Leaving the block
    with an exception removes the temp file; leaving it normally checks that every tensor was written.
    """

    def __init__(self, path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = pathlib.Path(path)
        self.specs = list(specs)
        self._next = 0
        self._tmp = tmp_path_for(self.path)
        header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": dtype_tag(s.dtype), "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._prefix = len(raw).to_bytes(8, "little") + raw
        self.size = len(self._prefix) + offset
        self._f = None
        self._hash = hashlib.sha256()

    def __enter__(self) -> "ShardWriter":
        try:
            self._f = open(self._tmp, "wb")
            self._put(self._prefix)
        except OSError as e:
            self._abort()
            raise_write_error(self.path, e)
        return self

    def _put(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"shard writer got {name} {tensor.dtype} {tuple(tensor.shape)}, planned {spec}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._put(memoryview(data))
        except OSError as e:
            self._abort()
            raise_write_error(self.path, e)
        self._next += 1

    def copy_from_file(self, name: str, src, start: int, length: int, chunk: int = 1 << 24) -> str:
        """Copy a tensor's bytes verbatim from another file in chunks (a dense tensor never enters memory
        whole); returns their sha256, as `range_sha256` would."""
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or spec.name != name or spec.nbytes != length:
            raise RuntimeError(f"shard writer got {name} ({length} bytes), planned {spec}")
        digest = hashlib.sha256()
        try:
            for block in _blocks(src, start, length, name, chunk):
                self._put(block)
                digest.update(block)
        except OSError as e:
            self._abort()
            raise_write_error(self.path, e)
        self._next += 1
        return digest.hexdigest()

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abort()
            return False
        if self._next != len(self.specs):
            self._abort()
            raise RuntimeError(f"shard {self.path.name} closed after {self._next} of {len(self.specs)} tensors")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        except OSError as e:
            self._abort()
            raise_write_error(self.path, e)
        return False


def write_shard(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a whole dict of tensors as one shard (names sorted); returns the file's sha256."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sorted(tensors.items())]
    with ShardWriter(path, specs, metadata) as w:
        for s in specs:
            w.write(s.name, tensors[s.name])
    return w.sha256()


def human_size(n: float) -> str:
    """A byte count as people read file sizes, in powers of 1000: `433 B`, `1.5 MB`."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def natural_key(name: str):
    """Sort key that puts `layers.2` before `layers.10`, so shards and lists follow the model's layer order."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _blocks(path, start: int, length: int, name: str, chunk: int = 1 << 24):
    """The bytes [start, start + length) of `path` in blocks; a file that ends early is corrupt."""
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise _corrupt(path, f"{name} ends early")
            yield block
            left -= len(block)


def range_sha256(path, start: int, length: int, name: str = "data") -> str:
    """sha256 of the bytes [start, start + length) of `path` (a tensor's data: what a resume compares)."""
    h = hashlib.sha256()
    try:
        for block in _blocks(path, start, length, name):
            h.update(block)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e.strerror}); check the file.") from None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class ShardHeader:
    """The parsed header of one safetensors file: tensors (in file order), metadata, data start offset."""

    path: pathlib.Path
    tensors: dict[str, TensorSpec]
    offsets: dict[str, tuple[int, int]]
    metadata: dict[str, str]
    data_start: int

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` of this file (`read_tensor`)."""
        return read_tensor(self.path, self.tensors[name], self.data_start + self.offsets[name][0])


def _corrupt(path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path} is not a valid safetensors file ({what}); the file is truncated or "
                                  "corrupted: download or write it again.")


def read_header(path) -> ShardHeader:
    """Parse and check a safetensors header against the file size; every failure names the file."""
    path = pathlib.Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"only {size} bytes")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise _corrupt(path, f"header length {n} does not fit in {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e.strerror}); check the path and permissions.") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"unreadable header: {e}") from None
    meta = header.pop("__metadata__", None) or {}
    tensors, offsets, spans = {}, {}, []
    try:
        for name, info in header.items():
            if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in _TAG_DTYPES:
                raise UnsupportedCheckpointError(
                    f"{path}: tensor {name} has dtype {info['dtype']}, which this ptqtp (and torch "
                    f"{torch.__version__}) cannot read; convert the checkpoint to bfloat16/float16/float32.")
            dtype = tag_dtype(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != nbytes(dtype, shape):
                raise ValueError(f"tensor {name} has {end - begin} bytes for shape {shape}")
            tensors[name] = TensorSpec(name, dtype, shape)
            offsets[name] = (begin, end)
            spans.append((begin, end))
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, f"bad tensor entry: {e}") from None
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise _corrupt(path, "tensor data offsets overlap or leave gaps")
        pos = end
    if 8 + n + pos != size:
        raise _corrupt(path, f"expected {8 + n + pos} bytes, found {size}")
    return ShardHeader(path, tensors, offsets, {str(k): str(v) for k, v in meta.items()}, 8 + n)


def read_tensor(path, spec: TensorSpec, start: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The one way ptqtp reads tensor data: `spec`'s tensor, or its rows [r0, r1), from byte `start` of `path`.

    Plain file I/O, no mmap, so resident memory stays what was asked for (rows are contiguous in safetensors'
    row-major data); a short file or an unreadable one raises `CorruptCheckpointError` naming the file.
    """
    shape = spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])
    row_bytes = nbytes(spec.dtype, spec.shape[1:]) if spec.shape else 0
    buf = bytearray(nbytes(spec.dtype, shape))
    try:
        with open(path, "rb") as f:
            f.seek(start + (rows[0] * row_bytes if rows else 0))
            if f.readinto(buf) != len(buf):
                raise _corrupt(path, f"{spec.name} ends early")
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path} ({e.strerror}); check the file.") from None
    if not buf:
        return torch.empty(shape, dtype=spec.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(spec.dtype).reshape(shape)


def shard_files(model_dir) -> list[pathlib.Path]:
    """The safetensors files of a model directory: from the index when there is one, else `*.safetensors`."""
    d = pathlib.Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index} is not a valid index ({e}); write or download it again.") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CorruptCheckpointError(f"{index} lists {missing[0]}, which is missing from {d}; "
                                         "the download or write is incomplete.")
        return [d / n for n in names]
    return sorted(p for p in d.glob("*.safetensors") if TMP_MARK not in p.name)


def check_metadata_version(header: ShardHeader) -> None:
    """A shard written by a newer ptqtp format refuses to load."""
    v = header.metadata.get(fmt.META_FORMAT_VERSION)
    if v is None:
        return
    try:
        version = int(v)
    except ValueError:
        raise _corrupt(header.path, f"metadata {fmt.META_FORMAT_VERSION}={v!r}") from None
    if version > fmt.FORMAT_VERSION:
        raise FormatVersionError(f"{header.path} uses ptqtp format version {version}, newer than this ptqtp reads "
                                 f"({fmt.FORMAT_VERSION}); upgrade ptqtp (pip install -U ptqtp).")


def _fits(in_lo: int, in_hi: int, n: int, per: int) -> bool:
    """True if some in_features in [in_lo, in_hi] gives ceil(in / per) == n."""
    return any(math.ceil(i / per) == n for i in range(max(in_lo, 1), in_hi + 1))


def check_pair(path, name: str, packed: TensorSpec, scales: TensorSpec, group_size: int) -> None:
    """Shapes of a packed tensor and its scales agree with each other and with `group_size`."""
    ok = (packed.dtype == torch.uint8 and scales.dtype == torch.float16 and len(packed.shape) in (3, 4)
          and len(scales.shape) == len(packed.shape) and packed.shape[:-1] == scales.shape[:-1]
          and packed.shape[-3] == fmt.NUM_PLANES)
    nb = packed.shape[-1] if packed.shape else 0
    if ok:
        lo, hi = 5 * nb - 4, 5 * nb
        groups = scales.shape[-1]
        ok = _fits(lo, hi, groups, group_size)
    if not ok:
        raise CorruptCheckpointError(
            f"{path}: {name} {packed.dtype} {packed.shape} with scales {scales.dtype} {scales.shape} does not fit "
            f"group_size={group_size} of config.json (expected uint8 (2, out, ceil(in/5)) and float16 "
            "(2, out, ceil(in/group_size))); the checkpoint is corrupt or its config was edited.")


@dataclass
class CheckpointInfo:
    """What `validate_checkpoint` found: config, files, and the quantized tensors with their byte counts."""

    path: pathlib.Path
    config: TritPlaneConfig
    hf_config: dict
    files: list[pathlib.Path]
    quantized: dict[str, tuple[TensorSpec, TensorSpec]] = field(default_factory=dict)  # name -> (packed, scales)
    dense: dict[str, TensorSpec] = field(default_factory=dict)
    file_bytes: int = 0

    @property
    def quantized_bytes(self) -> int:
        return sum(p.nbytes + s.nbytes for p, s in self.quantized.values())


def looks_like_path(ref: str) -> bool:
    """True for a model reference that cannot be a hub id (`name` or `owner/name`): absolute, relative with ./
    or ~, deeper than owner/name, or with backslashes. Such a reference names a folder, and a missing folder
    is reported as one (never sent to the hub)."""
    return os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref


def read_hf_config(model_dir) -> dict:
    path = pathlib.Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise UnsupportedCheckpointError(f"{model_dir} has no config.json, so it is not a Hugging Face model folder; "
                                         "point at the folder save_pretrained wrote.")
    try:
        cfg = json.loads(path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        return cfg
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}); restore the file.") from None


def validate_checkpoint(model_dir, *, deep: bool = False) -> CheckpointInfo:
    """Check a ptqtp directory without loading a model: config, format version, every header, shape agreement.

    Args:
        model_dir: folder with config.json (holding a ptqtp `quantization_config`) and safetensors shards.
        deep: also read every packed tensor and its scales: bytes must be valid base-3 (<= 242) and scales
            finite (slow on big models; catches flipped data bytes that the header check cannot see).
    """
    d = pathlib.Path(model_dir)
    hf_config = read_hf_config(d)
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != fmt.QUANT_METHOD:
        raise UnsupportedCheckpointError(f"{d} is not a ptqtp checkpoint (config.json has no ptqtp "
                                         "quantization_config); quantize it first with `ptqtp quantize`.")
    config = TritPlaneConfig.from_dict(qc)
    files = shard_files(d)
    if not files:
        raise CorruptCheckpointError(f"{d} has no safetensors shards; the write is incomplete, run ptqtp quantize "
                                     "again with --resume.")
    info = CheckpointInfo(d, config, hf_config, files)
    for path in files:
        header = read_header(path)
        check_metadata_version(header)
        info.file_bytes += path.stat().st_size
        pairs = packed_pairs(header.tensors)
        scales = set(pairs.values())
        for name, spec in header.tensors.items():
            if name in pairs:
                check_pair(path, name, spec, header.tensors[pairs[name]], config.group_size)
                info.quantized[name] = (spec, header.tensors[pairs[name]])
                if deep:
                    _deep_check(header, name, pairs[name])
            elif name not in scales:
                _check_unpaired(path, name, spec, header.tensors)
                info.dense[name] = spec
    return info


def _plane_like(spec: TensorSpec, dtype: torch.dtype) -> bool:
    """(2, out, x), or (E, 2, out, x) for fused experts, of `dtype`: packed planes (uint8) or scales (fp16)."""
    return spec.dtype == dtype and len(spec.shape) in (3, 4) and spec.shape[-3] == fmt.NUM_PLANES


def packed_pairs(tensors: dict[str, TensorSpec]) -> dict[str, str]:
    """Packed tensor name -> its scales' name, for the pairs ptqtp writes: `X` beside `scale_name(X)` where
    either looks like ptqtp's half (uint8 planes, float16 scales; `check_pair` then checks both). Dense
    tensors whose names end in `_scale` (gemma4 `per_expert_scale`, deepseek `hc_scale`) never pair."""
    return {n: scale_name(n) for n, spec in tensors.items() if scale_name(n) in tensors
            and (_plane_like(spec, torch.uint8) or _plane_like(tensors[scale_name(n)], torch.float16))}


def _check_unpaired(path, name: str, spec: TensorSpec, tensors: dict[str, TensorSpec]) -> None:
    """Half of a ptqtp pair without the other half is damage: packed planes without scales, or float16
    scales named after a packed tensor that is not there."""
    if _plane_like(spec, torch.uint8) and name.endswith("." + fmt.WEIGHT_SUFFIX):
        raise CorruptCheckpointError(f"{path}: {name} holds packed trit-planes but {scale_name(name)} is missing; "
                                     "the shard is corrupt, quantize again.")
    if name.endswith("." + fmt.SCALE_SUFFIX):  # a Linear's scales: (2, out, G)
        base, dims = name[: -len(fmt.SCALE_SUFFIX)] + fmt.WEIGHT_SUFFIX, 3
    else:  # fused experts' scales: (E, 2, out, G)
        base, dims = name.removesuffix("_scale"), 4
    if base != name and _plane_like(spec, torch.float16) and len(spec.shape) == dims and base not in tensors:
        raise CorruptCheckpointError(f"{path}: {name} has no packed weight beside it; the shard is corrupt, "
                                     "quantize again.")


def _deep_check(header: ShardHeader, name: str, sname: str) -> None:
    packed = header.read(name)
    if packed.numel() and int(packed.max()) >= 3 ** fmt.TRITS_PER_BYTE:
        raise _corrupt(header.path, f"{name} holds byte values above 242, impossible in base-3 packing")
    scales = header.read(sname)
    if not torch.isfinite(scales).all():
        raise _corrupt(header.path, f"{sname} holds NaN or Inf scales")
