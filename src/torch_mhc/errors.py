"""The error every room raises for bad user input; the ``mhc`` command reports it in one paragraph
with exit code 2 and no traceback. Imports nothing from the package."""


class UserError(Exception):
    """A problem with the user's input (config, data, run directory, checkpoint): reported in one
    paragraph, exit code 2, no traceback."""


def _chain(error: BaseException):
    """``error`` and the exceptions it was raised from or while handling (torch.save's RuntimeError
    keeps the OSError of the failed write as its context)."""
    seen: list[BaseException] = []
    while error is not None and not any(error is s for s in seen):
        seen.append(error)
        yield error
        error = error.__cause__ or error.__context__


def _existing(path) -> str:
    """``path`` or its nearest existing parent."""
    import os

    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def is_read_only(path) -> bool:
    """Whether ``path`` (or, when it does not exist yet, its nearest existing parent) is on a read-only file system."""
    import os

    try:
        return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# free space below which a failed write is taken for a full disk when the library that wrote did not keep the errno
LOW_SPACE = 1 << 20


def write_failure(error: BaseException, path) -> str | None:
    """What made a write of ``path`` fail: ``"full"`` (no space left or quota exhausted), ``"read-only"``
    (a read-only file system) or None (something else). Whatever the writing library raised:
    the errno of an OSError in the exception's chain, the ``os error N`` that safetensors (Rust) puts
    in its message, and otherwise (numpy's "N requested and M written", errno lost) the file system
    itself: read-only, or less than ``LOW_SPACE`` bytes free right after the failure. Call it before
    removing what the failed write left (that frees the space)."""
    import errno
    import os
    import re

    for e in _chain(error):
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := re.search(r"\(os error (\d+)\)", str(e))):
            code = int(m.group(1))
        if code in (errno.ENOSPC, errno.EDQUOT):
            return "full"
        if code == errno.EROFS:
            return "read-only"
    if not isinstance(error, (OSError, RuntimeError)) and type(error).__name__ != "SafetensorError":
        return None
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "read-only"
    if st.f_bavail * st.f_frsize < LOW_SPACE:
        return "full"
    return None


def discard(path) -> None:
    """Remove file ``path`` if it is there; never raises (on a read-only file system even a missing file's
    unlink fails)."""
    import os

    try:
        os.unlink(path)
    except OSError:
        pass


def write_error(error: BaseException, path, then: str, note: str = "nothing half-written was left behind"
                ) -> UserError | None:
    """The UserError for a write of ``path`` that failed with ``error`` on a full disk or a read-only
    file system (None for any other failure): ``note`` says what state things are in, ``then`` what to
    run once space is freed or the file system is writable (``"continue with --resume"``)."""
    kind = write_failure(error, path)
    if kind == "full":
        return UserError(f"the disk is full (or the quota exhausted) while writing {path}; {note}. "
                         f"Free some space, then {then}.")
    if kind == "read-only":
        return UserError(f"cannot write {path}: it is on a read-only file system; {note}. Make it writable or "
                         f"choose a writable location, then {then}.")
    return None
