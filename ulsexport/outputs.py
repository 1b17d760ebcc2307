"""Output directories that appear whole or not at all."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False, protect: tuple[Path, ...] = ()):
    """Yield a temporary directory next to `out`; rename it to `out` only if the block succeeds.

    An existing `out` is refused unless `force`; `protect` lists inputs that `out` must not be,
    or lie inside, so that an input is never overwritten.
    """
    out = Path(out).absolute()
    for src in protect:
        src = Path(src).resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise UserError(f"--out {out} would overwrite the input {src}; choose another directory")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
