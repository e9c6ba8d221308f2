"""An output folder that appears complete or not at all: written in a hidden sibling folder, renamed into place when
everything succeeded, removed (with any parent folders it had to create) when anything failed."""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .rules import ConversionError


def check_output_folder(folder: str) -> None:
    """Refuse an output that exists and is not an empty folder: its files would mix with the conversion's, or be lost."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConversionError(f"The output folder {folder} is not empty; choose a new or empty folder.")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConversionError(f"The output {folder} is a file; choose a new or empty folder.")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConversionError(
            f"The output {folder} would be inside {parent}, which is a file, not a folder (NotADirectoryError); choose "
            "an output whose parent folders are folders."
        )


def check_free_space(folder: str, num_bytes: int) -> None:
    """Refuse to start when the disk that will hold `folder` has less than `num_bytes` free."""
    existing = os.path.abspath(folder)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < num_bytes:
        raise ConversionError(
            f"The converted checkpoint needs about {_size(num_bytes)} but {existing} has {_size(free)} free; free some "
            "space or choose an --output on another disk."
        )


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


@contextmanager
def staged_folder(folder: str) -> Iterator[str]:
    """A new hidden folder beside `folder` to write into; renamed to `folder` (new, or an empty folder, which it
    replaces) when the block succeeds. When the block raises, the staging folder and the parent folders created for it
    are removed, and the error goes on."""
    folder = os.path.abspath(folder)
    check_output_folder(folder)
    parent = os.path.dirname(folder)
    created = _missing_ancestors(parent)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(folder)}.partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        yield staging
        check_output_folder(folder)  # nothing may have appeared there meanwhile
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for ancestor in created:
            if os.path.isdir(ancestor) and not os.listdir(ancestor):
                os.rmdir(ancestor)
        raise


def _missing_ancestors(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, deepest first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing
