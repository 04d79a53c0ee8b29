"""This node's disk: its llm-ray cache, and replacing a folder whole."""

from __future__ import annotations

import errno
import functools
import os
import secrets
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """This node's llm-ray cache: $LLM_RAY_CACHE, else $XDG_CACHE_HOME/llm-ray, else ~/.cache/llm-ray."""
    if os.environ.get("LLM_RAY_CACHE"):
        return Path(os.environ["LLM_RAY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-ray"


def node_cache(*parts: str) -> Path:
    """A folder of this node's cache ($LLM_RAY_CACHE, else ~/.cache/llm-ray) for copies of remote files."""
    return cache_dir().joinpath(*parts)


RENAME_EXCHANGE = 2  # linux/fs.h: renameat2 swaps the two paths
AT_FDCWD = -100  # paths relative to the working directory (absolute ones are anyway)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """The C library's renameat2, or None (not Linux, or glibc before 2.28)."""
    import ctypes
    import ctypes.util

    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the
    C library, kernel or filesystem lacks it (not Linux, glibc before 2.28, some network filesystems)."""
    import ctypes

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_folder(new: Path, target: Path) -> None:
    """Put the local folder new at target, in place of the folder there, so that a reader always finds
    target whole: the old folder or the new one, never neither, never a mix. Where target exists it is
    swapped with new in one step (exchange_paths) and the old folder, now at new, is deleted.

    Without that swap (see exchange_paths) the old folder is renamed aside first and new renamed in: two
    renames on the same disk, no data copied, between which (microseconds) target is missing."""
    new, target = Path(new), Path(target)
    try:
        os.rename(new, target)  # nothing there (or an empty folder): one atomic step
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if exchange_paths(new, target):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = target.with_name(f".{target.name}.{secrets.token_hex(8)}.old")
    os.rename(target, aside)
    os.rename(new, target)
    shutil.rmtree(aside, ignore_errors=True)
