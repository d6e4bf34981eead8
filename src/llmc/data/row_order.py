"""The seeded order in which calibration rows are drawn, produced one row at a time.

Calibration needs a few hundred rows of datasets that can hold hundreds of millions, so the
order must cost time and memory for the rows read only, never a list or permutation of all of
them. The rows a seed picks decide the calibration and so the checkpoint's bytes: the orders
below are the ones llmc has always used (``torch.randperm`` up to ``_RANDPERM_ORDER_MAX_ROWS``
rows, ``random.Random`` draws above), now computed lazily, and must not change.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

__all__ = ["row_order"]

# Up to this many rows the order is torch.randperm's; above it, random.Random's draws.
_RANDPERM_ORDER_MAX_ROWS = 1 << 22


def row_order(num_rows: int, shuffle: bool, seed: int) -> Iterator[int]:
    """Row indices in the order samples are drawn; every prefix is the same for a given seed."""
    if not shuffle:
        return iter(range(num_rows))
    if num_rows <= _RANDPERM_ORDER_MAX_ROWS:
        return _randperm_order(num_rows, seed)
    return _drawn_order(num_rows, seed)


def _randperm_order(num_rows: int, seed: int) -> Iterator[int]:
    """``torch.randperm(num_rows, generator=manual_seed(seed))``, one index at a time.

    torch's CPU randperm (for n below 2**32 / 20) is a forward Fisher-Yates shuffle over
    ``r = [0, n)``: step ``i`` swaps ``r[i]`` with ``r[i + random() % (n - i)]``, and ``r[i]`` is
    final from then on. ``torch.randint(n - i)`` makes that same draw from the same generator, so
    replaying the steps, with only the positions a swap has touched kept in a dict, yields the
    permutation's prefix in memory proportional to its length. The tests compare it with
    ``torch.randperm`` itself::

        step i:  r = [ final ... | i  ......  i+z  ...... ]   z = random() % (n - i)
                                   ^--swap---^
    """
    generator = torch.Generator().manual_seed(seed)
    moved: dict[int, int] = {}  # position -> row now there, for positions a swap has touched
    for position in range(num_rows - 1):
        other = position + int(torch.randint(num_rows - position, (1,), generator=generator))
        here = moved.pop(position, position)
        if other == position:
            yield here
            continue
        yield moved.get(other, other)
        moved[other] = here
    if num_rows > 0:
        yield moved.pop(num_rows - 1, num_rows - 1)


def _drawn_order(num_rows: int, seed: int) -> Iterator[int]:
    """Distinct uniform draws for the first half, then the rest shuffled.

    Rejection sampling stays cheap while at most half the indices are taken. The rest is listed
    only once half the rows have been read, so its memory is of the order of the rows already
    read. ``random.shuffle`` fixes the first position last, so the rest cannot be drawn lazily
    without changing which rows come after the first half.
    """
    rng = random.Random(seed)
    seen: set[int] = set()
    while len(seen) < num_rows // 2:
        index = rng.randrange(num_rows)
        if index not in seen:
            seen.add(index)
            yield index
    rest = [i for i in range(num_rows) if i not in seen]
    rng.shuffle(rest)
    yield from rest
