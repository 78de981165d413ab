"""Tensors written to one file, one tensor at a time: safetensors (`write_safetensors`) and
torch.save's .pth (`write_pth`), byte for byte what safetensors' save_file and torch.save write.

Their writers need every tensor in memory at once, which for a LazyTensors (merged Meta shards,
permuted or cast weights) is a second copy of the weights; these make each tensor as its turn
comes and drop it after. checkpoint.py lays such files out as checkpoint directories.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import json
import os
import pickle
import struct
import types
from pathlib import Path

import torch

from chameleon.convert import LazyTensors, Tensors, specs, standalone


# safetensors' dtype names, in the order its writer sorts tensors by (descending; then by name).
# Every floating-point dtype a checkpoint may hold (`_state_dict` takes any) has one; float8_e8m0fnu
# came in torch 2.7.
_SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                       torch.float8_e4m3fn: "F8_E4M3", getattr(torch, "float8_e8m0fnu", None): "F8_E8M0",
                       torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
                       torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
                       torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_SAFETENSORS_RANK = {dtype: i for i, dtype in enumerate(_SAFETENSORS_DTYPES)}


def write_safetensors(tensors: Tensors, file: Path, metadata: dict | None = None) -> None:
    """A safetensors file written one tensor at a time: the header from the tensors' specs, then each
    tensor made (a LazyTensors' merge, permutation or cast), written and dropped. safetensors'
    `save_file` needs all of them in memory at once, which for merged Meta shards is a second copy
    of the weights. Same bytes as `save_file` (its tensor order, header and padding; metadata of more
    than one key aside, which save_file orders at random); the file gets the mode of any other new
    file (save_file's is 0600)."""
    spec = specs(tensors)
    order = sorted(spec, key=lambda k: (-_SAFETENSORS_RANK[spec[k].dtype], k))
    header: dict = {} if metadata is None else {"__metadata__": metadata}  # (save_file writes an empty one too)
    offset = 0
    for name in order:
        end = offset + spec[name].nbytes
        header[name] = {"dtype": _SAFETENSORS_DTYPES[spec[name].dtype], "shape": list(spec[name].shape), "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # (serde_json's: UTF-8 unescaped)
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in order:
            t = tensors[name]  # made here, and dropped before the next is made
            assert t.shape == spec[name].shape and t.dtype == spec[name].dtype, name  # a spec disagreeing with its tensor
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer: no copy
            del t
    os.chmod(file, 0o666 & ~_umask())


def _pth_streaming() -> bool:
    """Whether this torch has what write_pth streams with: torch.save's own zip writing and
    pickling (private), and skip_data's saving of fake tensors as real ones (a prototype, 2.5+)."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
    except ImportError:
        return False
    ser = torch.serialization
    return (hasattr(FakeTensorMode, "from_tensor") and hasattr(ser, "_save") and hasattr(ser, "_open_zipfile_writer") and hasattr(ser, "skip_data")
            and "materialize_fake_tensors" in inspect.signature(ser.skip_data).parameters)


_PTH_STREAMING = _pth_streaming()


class _PthPickler(pickle._Pickler):
    """Python's pickler (whose save_pers can be overridden), giving a storage's location string
    as one object, as torch.save's pickle does (a fake tensor's is a new string each): pickle
    memoizes it, so the bytes are torch.save's."""

    locations: dict[str, str] = {}

    def save_pers(self, pid):
        super().save_pers(pid[:3] + (self.locations.setdefault(pid[3], pid[3]),) + pid[4:])


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc's
except (OSError, AttributeError, TypeError):  # another C library, another system
    _MALLOC_TRIM = None


def _give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere nothing). Tensors made and
    dropped one at a time (q/k rows permuted, shards' slices cut) come from glibc's heap once the
    first is freed (that raises its mmap threshold to their size, up to 32 MiB), where the freed
    space fragments: HF -> Meta of 2.2 GB held 0.04 to 0.15 of the weights more from run to run
    (2 shards: 0.11 to 0.28), none with this after each tensor."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _FillingWriter:
    """torch.save's zip writer, writing each storage where skip_data would leave its space empty:
    `storage(key)` makes it when its turn comes, and nothing keeps it after."""

    def __init__(self, writer, storage):
        self._writer, self._storage = writer, storage
        self.making = False  # a tensor being made: its failure is not the writer's

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        self.making = True
        storage = self._storage(int(name.removeprefix("data/")))
        self.making = False
        assert storage.nbytes() == nbytes, name
        self._writer.write_record(name, storage, nbytes)
        del storage
        _give_back_freed_memory()


@contextlib.contextmanager
def pth_write_errors(file: Path, writer: _FillingWriter | None = None):
    """torch's zip writer failing (a full disk, a file-size limit) raises a RuntimeError with no
    errno ('basic_ios::clear: iostream error', replaced by 'unexpected pos' as it closes): an
    OSError naming the file instead, which convert reports as an error, not a traceback. A
    tensor's making failing (`writer.making`) is left as it is."""
    try:
        yield
    except RuntimeError as err:
        if writer is not None and writer.making:
            raise
        raise OSError(f"{file}: the write failed (torch says {str(err).strip()!r}: most likely a full disk or a file-size limit)") from err


def write_pth(tensors: Tensors, file: Path) -> None:
    """`torch.save(dict(tensors), file)` made, written and dropped one tensor at a time: torch.save
    needs every tensor in memory at once, which for merged Meta shards is a second copy of the
    weights. Same bytes as torch.save: the file is torch.save's of fake tensors (shapes, no data)
    under skip_data, whose reserved space is filled with each storage as torch writes it. A dict's
    tensors are written as torch.save writes them (a view: its whole storage); a LazyTensors' as
    made, contiguous and alone. Plain torch.save where torch lacks the APIs this uses."""
    lazy = isinstance(tensors, LazyTensors)
    if not _PTH_STREAMING:  # (every tensor made at once)
        made = {name: standalone(tensors[name]) if lazy else tensors[name] for name in tensors}
        with pth_write_errors(file):
            torch.save(made, file)
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:  # (a dict's: fakes sharing storages as its tensors do, torch.save writing each once)
        fakes = {k: torch.empty(t.shape, dtype=t.dtype) if lazy else mode.from_tensor(t) for k, t in specs(tensors).items()}
    first: dict[int, str] = {}  # storage -> the first tensor of it: torch.save's key order
    for name, fake in fakes.items():
        first.setdefault(fake.untyped_storage()._cdata, name)
    owner = list(first.values())

    def storage(key: int) -> torch.UntypedStorage:
        t = tensors[owner[key]]
        if lazy:
            assert t.shape == fakes[owner[key]].shape and t.dtype == fakes[owner[key]].dtype, owner[key]  # a spec disagreeing with its tensor
            t = standalone(t)
        return t.untyped_storage()

    ser = torch.serialization
    writer = _FillingWriter(None, storage)  # (its zip writer: opened below, within pth_write_errors)
    with pth_write_errors(file, writer), ser.skip_data(materialize_fake_tensors=True), ser._open_zipfile_writer(str(file)) as zf:
        writer._writer = zf
        ser._save(fakes, writer, types.SimpleNamespace(Pickler=_PthPickler), ser.DEFAULT_PROTOCOL, False)


def _umask() -> int:
    """The process's umask: read from /proc on Linux; elsewhere reading it means setting it for an
    instant (a file another thread creates meanwhile would get 022)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask
