"""Progress bars (tqdm) that the --quiet flag turns off."""
from __future__ import annotations

import contextlib

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", quiet: bool = False):
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=quiet, leave=False)
    try:
        yield bar
    finally:
        bar.close()
