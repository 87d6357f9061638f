"""Decoded training files kept in memory (``DATALOADER.DECODED_FILE_CACHE_MB``).

Decoding the image and label files is most of what a training mapper spends on a small image
(BENCHMARKS.md, "CPU training step"). When the training set is small enough to be seen many
times, keeping the decoded arrays saves that work on every later epoch; on a machine with few
cores the data-loader workers compete with the training step for them.
"""

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np

__all__ = ["DecodedFileCache", "MIB", "NO_CACHE"]

MIB = 1024 * 1024


class DecodedFileCache:
    """Least-recently-used arrays (decoded images, checked label maps) up to ``max_bytes``.

    Each data-loader worker is a process of its own with its own copy of the mapper, so each
    fills its own cache: the memory used is up to ``max_bytes`` per worker (and once more in the
    main process when ``DATALOADER.NUM_WORKERS`` is 0).

    Cached arrays are handed out read-only: a transform that wrote into its input would raise
    instead of silently changing every later sample of that file.
    """

    def __init__(self, max_bytes: int):
        """
        Args:
            max_bytes: memory budget; <= 0 turns the cache off (every :meth:`get` reads).
        """
        self.max_bytes = max_bytes
        self._arrays: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0

    @classmethod
    def from_mib(cls, mib: float) -> "DecodedFileCache":
        """A cache of ``mib`` MiB (``DATALOADER.DECODED_FILE_CACHE_MB``); <= 0: off."""
        return cls(int(mib * MIB))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._arrays)

    def get(self, key: Hashable, read: Callable[[], np.ndarray]) -> np.ndarray:
        """The array cached under ``key``, else ``read()`` (then cached if it fits the budget).

        ``key`` must name everything the result depends on (path, decoding format, ...).
        """
        if not self.enabled:
            return read()
        array = self._arrays.get(key)
        if array is not None:
            self._arrays.move_to_end(key)
            return array
        array = read()
        if array.nbytes > self.max_bytes:
            return array
        array.flags.writeable = False
        self._arrays[key] = array
        self._bytes += array.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._arrays.popitem(last=False)
            self._bytes -= evicted.nbytes
        return array


# Reads every time: the default of readers that accept a cache.
NO_CACHE = DecodedFileCache(0)
