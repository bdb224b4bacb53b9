"""Reading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

DCP stores its index (``dcp/.metadata``) as a plain pickle and loads it with ``pickle.load``;
non-tensor entries (the optimizer's hyper-parameters) are ``torch.save`` blobs that its default
planner loads with ``weights_only=False``. Either would run whatever a crafted file asks for.
Here:

- ``read_dcp_metadata`` unpickles ``.metadata`` with an allowlist: the DCP metadata dataclasses,
  ``torch.Size``, torch dtypes, the layout helper and ``pathlib`` paths. Any other global
  (``os.system``, ``builtins.eval``, ...) stops the load with ``CheckpointError`` before it is called;
- ``SafeFileSystemReader`` is DCP's filesystem reader with that unpickler;
- ``SafeLoadPlanner`` loads non-tensor entries only if ``torch.load(weights_only=True)`` accepts them.

Tensor shards are already read with ``weights_only=True`` by DCP itself.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from vaopd.manifest import CheckpointError

__all__ = ["read_dcp_metadata", "SafeFileSystemReader", "SafeLoadPlanner"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    *((_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                          "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                          "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # rebuilds torch.strided & co. from their names
    *((module, name) for module in ("pathlib", "pathlib._local") for name in ("Path", "PosixPath", "WindowsPath",
                                                                              "PurePosixPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
}


# torch's dtypes by name, read from the module's namespace: a name from the file never reaches
# getattr(torch, ...), whose lazy submodule imports would run on an arbitrary name.
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def read_dcp_metadata(path: Path) -> Metadata:
    """The DCP index at ``path`` (a ``.metadata`` file), unpickled with the allowlist above."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {e}; the file may be crafted to run code, "
                              "nothing from it was executed") from None
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, ValueError, ...)
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses ``read_dcp_metadata``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for a rank's own index only when there is no global one
        metadata = read_dcp_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that refuses non-tensor entries ``weights_only=True`` does not accept."""

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"DCP entry {read_item.dest_index.fqn}: refused to load ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); nothing from it was executed") from None
        value.seek(0)
        super().load_bytes(read_item, value)  # the same bytes, now known to hold only plain data
