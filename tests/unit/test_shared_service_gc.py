"""`freeze_startup_heap` (shared/service.py): the startup heap frozen once per process, never what a later
service run of the same process leaves behind."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.service import GC_YOUNG_THRESHOLD, freeze_startup_heap


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_the_startup_heap_is_frozen_once_and_later_cycles_are_still_collected() -> None:
    before = Node()
    freeze_startup_heap()
    frozen = gc.get_freeze_count()
    assert frozen > 0 and gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    # A second service run in the same process: what the first left behind is not pinned.
    later = Node()
    gone = weakref.ref(later)
    freeze_startup_heap()
    assert gc.get_freeze_count() == frozen
    del later
    gc.collect()
    assert gone() is None
    assert before.me is before  # frozen objects stay usable
