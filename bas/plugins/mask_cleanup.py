"""Mask cleanup for every mask source: --mask-threshold, --fill-holes, --mask-dilate, --mask-erode, --mask-feather."""

from __future__ import annotations

from bas import hookimpl
from bas.core.mask_cleanup import cleanup_options


@hookimpl
def bas_run_options():
    # The operations live in bas.core.mask_cleanup and apply to whichever source made the masks;
    # this plugin only offers them, so `--plugin no:mask-cleanup` leaves masks exactly as loaded.
    return cleanup_options()
