"""Output directories that appear whole or not at all, and never at the cost of a user's file.

`atomic_output_dir` is the one place every command that writes a directory goes through:

- paths are resolved first (symlinks, `.`, the empty string); an `--out` that is, contains or lies
  inside an input is refused, and so is a dangling symlink;
- an existing `--out` is replaced only with `force`, and only if ulsexport wrote it (it holds an
  `ulsexport.json` manifest) or it is empty: never an arbitrary directory;
- the work happens in a temporary directory beside `--out` (`.NAME.tmp-XXXXXXXX`, or
  `.ulx-tmp-XXXXXXXX` where NAME is too long for that), which holds a small marker naming the
  intended output and the process writing it; the next run towards the same place removes such
  leftovers of runs that are gone (SIGKILL, power loss) and names those it cannot attribute;
- the final rename never replaces a target that appeared meanwhile (another run's output): that
  run's work wins and this one ends with a one-line error;
- interrupts (Ctrl-C, SIGTERM through the CLI's handler) during the final renames are deferred
  until they are done, so an output is either complete or absent;
- the directory gets the mode the umask gives (not mkdtemp's 0700), and OS errors (read-only or
  full disk, permission denied) become one-line UserErrors.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from .errors import UserError

MANIFEST_NAME = "ulsexport.json"       # what ulsexport writes into every output (artifact.MANIFEST_NAME)
MARKER_NAME = ".ulsexport-partial.json"
SHORT_PREFIX = ".ulx-tmp-"
NAME_MAX = 255
# errno values that mean "the disk or the permissions refuse", reported as one line
IO_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO, errno.EFBIG,
             errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ELOOP}

_critical = {"depth": 0, "pending": None}


def deliver_interrupt(exc: BaseException) -> None:
    """Raise `exc` now, or, inside an output's final renames, as soon as they are done."""
    if _critical["depth"]:
        _critical["pending"] = exc
        return
    raise exc


@contextlib.contextmanager
def _uninterruptible():
    _critical["depth"] += 1
    try:
        yield
    finally:
        _critical["depth"] -= 1
    pending = _critical["pending"]
    if _critical["depth"] == 0 and pending is not None:
        _critical["pending"] = None
        raise pending


def io_error(exc: OSError, what: str) -> UserError:
    """A one-line UserError for an OSError met while `what`."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return UserError(f"{what} failed: {exc.strerror or type(exc).__name__}{where}")


def resolve_path(path) -> Path:
    """An absolute path with every symlink resolved; '' means the working directory."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path) or ".")))


def check_writable_file(path, option: str) -> None:
    """Refuse, before any long work starts, a file output whose folder is missing or not writable."""
    if path is None:
        return
    target = Path(os.path.abspath(os.fspath(path)))
    parent = target.parent
    if target.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UserError(f"{option} {path}: {parent} is not writable")


def _check_protect(out: Path, protect) -> None:
    for src in protect:
        if src is None:
            continue
        src = resolve_path(src)
        how = ("is" if out == src else "lies inside" if src in out.parents
               else "contains" if out in src.parents else None)
        if how:
            raise UserError(f"--out {out} would overwrite the input {src} (it {how} it); "
                            "choose a directory outside every input")


def _replaceable(out: Path) -> bool:
    """Whether `--force` may replace `out`: an earlier ulsexport output, or an empty directory."""
    try:
        return (out / MANIFEST_NAME).is_file() or not any(out.iterdir())
    except OSError:
        return False


def _check_existing(out: Path, force: bool) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    if not _replaceable(out):
        raise UserError(f"--force replaces only an earlier ulsexport output (a directory holding {MANIFEST_NAME}); "
                        f"{out} is not one: move it away or choose another --out")


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_prefix(out: Path) -> str:
    prefix = f".{out.name}.tmp-"
    return prefix if len(prefix) + 8 <= NAME_MAX else SHORT_PREFIX


def _make_tmp(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    try:
        (tmp / MARKER_NAME).write_text(json.dumps({"out": out.name, "pid": os.getpid(),
                                                   "host": socket.gethostname()}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove the temporary directories that earlier runs towards `out` left when they were killed;
    name those that cannot be told apart from a run still at work."""
    own_prefix = f".{out.name}.tmp-"
    try:
        candidates = [p for p in out.parent.iterdir()
                      if p.name.startswith((own_prefix, SHORT_PREFIX)) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return
    host = socket.gethostname()
    for path in candidates:
        try:
            marker = json.loads((path / MARKER_NAME).read_text())
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict):
            if marker.get("out") != out.name:
                continue  # another output's (a long name's short temporary)
            if marker.get("host") == host and not _pid_alive(marker.get("pid")):
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    print(f"note: removed {path.name}, left beside {out.name} by an interrupted run "
                          f"(pid {marker.get('pid')})", file=sys.stderr)
                    continue
            elif marker.get("host") == host:
                continue  # a run still at work
        elif not path.name.startswith(own_prefix):
            continue  # not ours to judge
        print(f"note: {path} looks like the leftover of an interrupted run towards {out.name}; "
              "remove it if no other run is writing there", file=sys.stderr)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, raising FileExistsError if `dst` exists (even as an empty directory)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    # No renameat2 (or a file system without it): claim `dst` with mkdir, which fails if it exists,
    # then replace the empty directory we own.
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Put `tmp` in place of `out`; never replaces what another run wrote meanwhile unless `force`
    allows replacing it (an ulsexport output)."""
    (tmp / MARKER_NAME).unlink(missing_ok=True)
    os.chmod(tmp, 0o777 & ~_umask())
    appeared = f"{out} appeared while this run was writing it (another run?); it was left as it is"
    try:
        rename_noreplace(tmp, out)
        return
    except FileExistsError:
        if not (force and out.is_dir() and not out.is_symlink() and _replaceable(out)):
            raise UserError(appeared) from None
    trash = _make_tmp(out)
    try:
        os.rename(out, trash / "old")
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise UserError(appeared) from None
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def check_output_dir(out, force: bool = False, protect: tuple = ()) -> Path:
    """The resolved `out`, after every check atomic_output_dir makes before writing (so that a
    command can refuse a bad --out before its long work starts); creates nothing."""
    given = Path(os.path.abspath(os.fspath(out) or "."))
    if given.is_symlink() and not given.exists():
        raise UserError(f"--out {out} is a symlink to {os.readlink(given)}, which does not exist; "
                        "remove the link or choose another path")
    out = resolve_path(given)
    if out.parent == out:
        raise UserError(f"--out {out} is a file system root; choose a directory below it")
    _check_protect(out, protect)
    _check_existing(out, force)
    ancestor = out.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {ancestor} is not writable")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, protect: tuple[Path, ...] = ()):
    """Yield a temporary directory next to `out`; put it in place of `out` only if the block succeeds.

    An existing `out` is refused unless `force`, and even then replaced only if ulsexport wrote it;
    `protect` lists inputs that `out` must not be, contain or lie inside.
    """
    out = check_output_dir(out, force, protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(exc, f"creating the folder of --out {out}") from None
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: {out.parent} is not a directory")
    _remove_stale(out)
    tmp = None
    try:
        try:
            with _uninterruptible():  # an interrupt now waits until `tmp` is known, so it is removed
                tmp = _make_tmp(out)
        except OSError as exc:
            raise io_error(exc, f"writing into {out.parent}") from None
        try:
            yield tmp
        except shutil.Error as exc:  # copytree's list of (src, dst, why): the first says what the disk refused
            errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
            why = errors[0][2] if errors and len(errors[0]) == 3 else str(exc)
            raise UserError(f"writing {out} failed: {why}") from None
        except OSError as exc:
            if exc.errno in IO_ERRNOS:
                raise io_error(exc, f"writing {out}") from None
            raise
        with _uninterruptible():
            try:
                _commit(tmp, out, force)
            except OSError as exc:
                raise io_error(exc, f"moving the finished output into place at {out}") from None
            tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
