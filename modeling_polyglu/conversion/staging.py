"""Write a directory so that it appears complete or not at all, and never at the expense of someone else's files.

Everything is written to a temporary sibling of the destination (`.tmp-<name>-*`, mode from the umask as
save_pretrained's directories) and renamed into place only when the block finishes without error; an exception
leaves nothing, a kill leaves at most that sibling, which the next run to the same destination removes once its
owner process is gone. The move into place never replaces a destination that appeared meanwhile (another run
finished first) unless overwriting was asked for, and overwriting replaces only a model directory — never one
that holds the source, never a directory of unrelated files.
"""

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterable

OWNER_FILE = ".polyglu-staging-owner"  # {"host", "pid"} of the process writing a staging directory
_AT_FDCWD = -100  # Linux's "relative to the working directory" for renameat2
_RENAME_NOREPLACE = 1


class DestinationExistsError(FileExistsError):
    """The destination exists (or appeared meanwhile) and may not be replaced."""


class UnsafeDestinationError(ValueError):
    """The destination is, or contains, one of the sources of the write."""


def is_model_directory(path: Path) -> bool:
    """A directory save_pretrained or a conversion wrote (a model or adapter config at its top)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def current_umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_unsafe_destination(destination: Path, sources: Iterable) -> None:
    for source in sources:
        if source is None:
            continue
        source = Path(source).resolve()
        if source == destination or destination in source.parents:
            raise UnsafeDestinationError(
                f"--dst {destination} is or contains the source {source}; choose a destination outside the source."
            )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_abandoned_staging(destination: Path) -> list[Path]:
    """Delete `.tmp-<name>-*` siblings whose writer (on this host) no longer runs; return what was removed."""
    removed = []
    for staging in destination.parent.glob(f".tmp-{destination.name}-*"):
        try:
            owner = json.loads((staging / OWNER_FILE).read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or still being created: leave it
        if host == socket.gethostname() and pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _rename_without_replacing(source: Path, target: Path) -> None:
    """Rename `source` to `target`, raising FileExistsError if `target` exists (atomically where Linux allows)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.ENOSYS, errno.EINVAL):  # unsupported by the kernel or filesystem: fall back
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)  # POSIX refuses a non-empty directory as the target
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        raise


def _check_replaceable(destination: Path, replaceable: Callable[[Path], bool]) -> None:
    if not destination.is_dir() or not (replaceable(destination) or not any(destination.iterdir())):
        raise DestinationExistsError(
            f"{destination} exists and is not a model directory; --overwrite replaces only directories this tool or "
            "save_pretrained wrote, so choose another destination."
        )


def _exists_message(destination: Path) -> str:
    return f"{destination} already exists; choose another destination or pass --overwrite to replace it."


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False, sources: Iterable = (), replaceable=is_model_directory):
    """Yield a temporary directory beside `destination`; move it to `destination` when the block succeeds.

    `sources`: paths read by the block, which `destination` may neither be nor contain. `replaceable(path)`: whether
    an existing destination may be replaced with `overwrite` (an empty directory always may).
    """
    destination = Path(destination).resolve()
    refuse_unsafe_destination(destination, sources)
    if destination.exists() or destination.is_symlink():
        if not overwrite:
            raise DestinationExistsError(_exists_message(destination))
        _check_replaceable(destination, replaceable)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(destination)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{destination.name}-", dir=destination.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would make the result private
        (staging / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        yield staging
        (staging / OWNER_FILE).unlink()
        if overwrite and destination.exists():
            _check_replaceable(destination, replaceable)
            backup = Path(tempfile.mkdtemp(prefix=f".old-{destination.name}-", dir=destination.parent))
            os.replace(destination, backup / destination.name)
            os.replace(staging, destination)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            try:
                _rename_without_replacing(staging, destination)
            except FileExistsError:
                raise DestinationExistsError(
                    f"{destination} appeared while this run was writing (another run finished first); it was kept "
                    "and this run's output discarded. Choose another destination or pass --overwrite."
                ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_file_atomically(path, write: Callable[[Path], None]) -> Path:
    """Call `write(staging_path)` on a sibling of `path`, then move that file to `path`: a reader, a crash or a
    full disk never leaves a half-written file where the last complete one was (reports rewritten during training).

    The staging name keeps the suffix (`.tmp-<pid>-<name>`), so writers that infer a format from it (matplotlib) work.
    """
    path = Path(path)
    staging = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)  # only left after a failed write
    return path


def write_text_atomically(path, text: str) -> Path:
    return write_file_atomically(path, lambda staging: staging.write_text(text))
