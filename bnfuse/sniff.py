"""Refuse a file that cannot be a Keras model before TensorFlow is imported (seconds).

A ``.keras`` file is a zip archive; a ``.h5`` file starts with the HDF5 signature (at
offset 0, or 512, 1024, 2048... when a user block precedes it).
"""

from __future__ import annotations

from pathlib import Path

from bnfuse.errors import ModelLoadError

__all__ = ["check_keras_file"]

_HDF5 = b"\x89HDF\r\n\x1a\n"
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive's end


def _hdf5_signature(path: Path) -> bool:
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            head = f.read(8)
            if len(head) < 8:
                return False
            if head == _HDF5:
                return True
            offset = 512 if offset == 0 else offset * 2


def check_keras_file(path: Path) -> None:
    """Raise :class:`ModelLoadError` when ``path`` is missing, empty, or not a zip
    (``.keras``) / HDF5 (``.h5``, ``.hdf5``) file. Directories pass (the Keras backend
    judges SavedModel directories)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        return
    try:
        size = path.stat().st_size
        if size == 0:
            raise ModelLoadError(f"{path}: empty file")
        if path.suffix.lower() == ".keras":
            with open(path, "rb") as f:
                if f.read(4) not in _ZIP:
                    raise ModelLoadError(f"{path}: not a .keras file (not a zip archive)")
        elif not _hdf5_signature(path):
            raise ModelLoadError(
                f"{path}: not a readable HDF5 model (no HDF5 signature; truncated or "
                "not an .h5 file?)"
            )
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror or exc}") from None
