"""Progress bars: one rule for every long stage of the suite.

A bar is off with ``quiet`` or when ``TQDM_DISABLE`` is set (read at call time: tqdm itself reads
it once, at import); otherwise ``disable=None`` lets tqdm turn it off where stderr is not a
terminal, so piped logs and CI get no carriage-return noise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def bars_disabled_by_env() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             quiet: bool = False, **kwargs: Any):
    """A ``tqdm`` bar (``leave=False`` unless given) that follows the rule above."""
    from tqdm.auto import tqdm

    disable = True if quiet or bars_disabled_by_env() else None
    return tqdm(iterable, total=total, desc=desc, disable=disable, **({"leave": False} | kwargs))
