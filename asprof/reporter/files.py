"""Files and directories the reporters write: private by default, never someone else's.

- A directory asprof creates is made by asprof, component by component, 0700 (or just
  readable by the group/others a ``file_mode`` shares profiles with); an existing
  directory is never chmod-ed: it is refused, with the fix in the message, when it is not
  ours or others can write in it (the spool: when others can reach it at all).
- The directory itself is never a symlink (``lstat``; what asprof creates is opened with
  ``O_DIRECTORY | O_NOFOLLOW`` before its mode is set through the descriptor).
- Files are created ``O_EXCL | O_NOFOLLOW`` and given their mode through the descriptor
  (0600 unless ``file_mode`` says otherwise), whatever the umask.
- A file being written is ``flock``-ed by its writer until it has its final name, so a
  later reporter can tell one abandoned by a killed process (lock free) from one being
  written (lock held), in this process or another, whatever their pid namespaces.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from typing import Optional, Union

from asprof.autostart.values import file_mode_problem

__all__ = ["DEFAULT_FILE_MODE", "check_file_mode", "directory_mode", "directory_problem", "secure_directory",
           "create_locked",
           "try_lock_abandoned", "maybe_being_created"]

log = logging.getLogger("asprof")

DEFAULT_FILE_MODE = 0o600


def check_file_mode(mode: object, who: str) -> int:
    """``mode`` as an int file mode: owner read/write, at most read for group and others."""
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"{who}: file_mode must be an int such as 0o600 or 0o640, not {mode!r}")
    problem = file_mode_problem(mode)
    if problem is not None:
        raise ValueError(f"{who}: {problem}")
    return mode


def directory_mode(file_mode: int) -> int:
    """The mode of a directory asprof creates for files of ``file_mode``: 0700, plus
    read and search for whoever may read the files."""
    shared = file_mode & 0o044
    return 0o700 | shared | (shared >> 2)


def _describe_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def _check_existing(path: str, st: os.stat_result, who: str, what: str, forbidden: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{who}: {what} {path!r} is a symbolic link; asprof does not follow symbolic links for "
                         f"the directories it writes in: give the real path ({os.path.realpath(path)!r}) if "
                         "that directory is private to this user")
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{who}: {what} {path!r} is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ValueError(f"{who}: {what} {path!r} belongs to uid {st.st_uid}, not to this process (uid {uid}); "
                         "use a directory of this user (a new path is created private)")
    if st.st_mode & forbidden:
        raise ValueError(
            f"{who}: {what} {path!r} can be reached by other users (mode {_describe_mode(st.st_mode)}); asprof "
            f"never changes the mode of an existing directory: run `chmod {'700' if forbidden & 0o044 else 'go-w'} "
            f"{path}` if it is yours alone, or give a new path (created private)")


def directory_problem(directory: Union[str, "os.PathLike[str]"], who: str, what: str = "directory",
                      forbidden: int = 0o022) -> Optional[str]:
    """Why :func:`secure_directory` would refuse the existing ``directory`` (None when it
    would accept it, or when it does not exist yet and would be created private). Changes nothing."""
    path = os.path.abspath(os.fspath(directory))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"{who}: cannot use {what} {path!r}: {e.strerror}"
    try:
        _check_existing(path, st, who, what, forbidden)
    except ValueError as e:
        return str(e)
    return None


def secure_directory(directory: Union[str, "os.PathLike[str]"], who: str, what: str = "directory",
                     mode: int = 0o700, forbidden: int = 0o022) -> str:
    """The absolute path of a directory fit for asprof's files, created (``mode``) if missing.

    Missing components are created one by one with ``mode``, each opened
    ``O_DIRECTORY | O_NOFOLLOW`` and ``fchmod``-ed (umask aside) only because asprof just
    made it. An existing last component must be a real directory (not a symlink), owned
    by this user, with none of the ``forbidden`` bits; ValueError saying how to fix it
    otherwise. Existing directories are never modified.
    """
    path = os.path.abspath(os.fspath(directory))
    missing = []
    probe = path
    while True:
        try:
            os.lstat(probe)
            break
        except FileNotFoundError:
            missing.append(probe)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        except OSError as e:
            raise ValueError(f"{who}: cannot create {what} {path!r}: {e.strerror}") from e
    for component in reversed(missing):
        try:
            os.mkdir(component, mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked below like any existing directory
        except OSError as e:
            raise ValueError(f"{who}: cannot create {what} {component!r}: {e.strerror}") from e
        try:
            fd = os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise ValueError(f"{who}: cannot open the {what} {component!r} just created: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():  # replaced by someone else's between mkdir and open
                raise ValueError(f"{who}: {what} {component!r} was replaced by another user's directory")
            os.fchmod(fd, mode)
        except OSError as e:
            raise ValueError(f"{who}: cannot set the mode of {what} {component!r}: {e.strerror}") from e
        finally:
            os.close(fd)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise ValueError(f"{who}: cannot use {what} {path!r}: {e.strerror}") from e
    _check_existing(path, st, who, what, forbidden)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{who}: {what} {path!r} is not writable by this process")
    return path


def create_locked(path: str, file_mode: int) -> int:
    """A new file at ``path`` (``O_EXCL``, never through a symlink), mode ``file_mode``
    whatever the umask, flock-ed by this process; FileExistsError when the name is taken."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # no locks here (some NFS)
                raise
        os.fchmod(fd, file_mode)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return fd


YOUNG_EMPTY_SECONDS = 60.0
#: How often a long-running reporter looks again for files a killed writer left (a process
#: sharing the directory, e.g. a pre-fork server's worker, may die at any time).
RECOVERY_PERIOD = 60.0


def maybe_being_created(size: int, mtime: float, writer_pid: int) -> bool:
    """Whether an empty, unlocked file may belong to a writer between creating and locking it
    (microseconds): only when it is empty, young, and its writer's pid is alive."""
    if size != 0 or time.time() - mtime >= YOUNG_EMPTY_SECONDS:
        return False
    try:
        os.kill(writer_pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


def try_lock_abandoned(path: str) -> Optional[int]:
    """A locked descriptor of the file at ``path`` when it was left by a writer that is
    gone: a regular file of this user (not a symlink) whose lock is free. None otherwise
    (someone is writing it, it is not ours, it vanished, or locks do not work here)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "not ours")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cur = os.lstat(path)
        if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
            raise OSError(errno.ESTALE, "replaced")
        return fd
    except OSError:
        os.close(fd)
        return None
