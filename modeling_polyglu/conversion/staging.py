"""Write a directory so that it appears complete or not at all.

Everything is written to a temporary sibling of the destination and renamed into place only when the block
finishes without error; an exception or a kill leaves at most a `.tmp-*` sibling, never a half-written model.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class DestinationExistsError(FileExistsError):
    """The destination exists and overwriting was not requested."""


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False):
    """Yield a temporary directory beside `destination`; move it to `destination` when the block succeeds."""
    destination = Path(destination).resolve()
    if destination.exists() and not overwrite:
        raise DestinationExistsError(
            f"{destination} already exists; choose another destination or pass --overwrite to replace it."
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{destination.name}-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".old-{destination.name}-", dir=destination.parent))
            os.replace(destination, backup / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
