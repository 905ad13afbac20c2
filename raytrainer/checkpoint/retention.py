"""Which checkpoints retention keeps. Pure: the store and the manager apply it.

Kept: the newest `keep_last` complete checkpoints, complete ones at multiples of `keep_every`, the pinned
ones (the guardian's last healthy checkpoint, the rollback target), and always the newest complete one.
Incomplete leftovers older than the newest complete one are torn saves and go; newer incomplete ones may
still be uploading and stay.
"""

from __future__ import annotations

from collections.abc import Iterable


def kept(complete: Iterable[int], keep_last: int, keep_every: int | None = None,
         pinned: Iterable[int] = ()) -> set[int]:
    """The complete steps retention keeps."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={keep_last} must be >= 1 (the newest complete checkpoint is "
                         "always kept)")
    complete = sorted(set(complete))
    if not complete:
        return set()
    keep = set(complete[-keep_last:]) | (set(pinned) & set(complete))
    if keep_every:
        keep |= {s for s in complete if s % keep_every == 0}
    return keep


def doomed(listed: Iterable[int], complete: Iterable[int], keep_last: int, keep_every: int | None = None,
           pinned: Iterable[int] = ()) -> list[int]:
    """The steps to delete, oldest first: `listed` holds every step directory, `complete` the complete ones."""
    complete = sorted(set(complete))
    if not complete:
        return []
    keep = kept(complete, keep_last, keep_every, pinned) | set(pinned)
    return sorted(s for s in set(listed) if s not in keep and s < complete[-1])
