"""A quiet terminal: our lines and our progress bars; the libraries' known-harmless noise hidden where it arises.

`verbose()` (environment `VLM_ALIGN_VERBOSE=1`, set by `--verbose`) shows everything. Each context here wraps the
one call that makes the noise, so nothing is silenced globally and a warning raised anywhere else still shows.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

VERBOSE_ENV = "VLM_ALIGN_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def without_library_progress_bars():
    """transformers' own bars (`Loading weights: 100%|...`) off for the duration, as they were after."""
    from transformers.utils import logging

    if verbose() or not logging.is_progress_bar_enabled():
        yield
        return
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.enable_progress_bar()
