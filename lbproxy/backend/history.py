"""Whether a resume point still has all its history (sans-IO: values in, a reason out)."""

from __future__ import annotations

from lbproxy.backend.store import View

EPOCH = "epoch"  # the room is in another epoch: Redis lost its data since
TRIMMED = "trimmed"  # messages after the resume point were trimmed (too old or too many)


def gap_reason(since: int, epoch: str | None, view: View) -> str | None:
    """Why messages after ``since`` (read in ``epoch``, None: unknown) are missing from ``view``
    (the room read after ``since``), or None when nothing is missing."""
    if epoch is not None and epoch != view.epoch:
        return EPOCH
    if view.entries:
        return TRIMMED if view.entries[0].prev > since else None
    return TRIMMED if view.last > since else None
