"""An LRU of prompt encodings for a long-running sampler (``Bundle.optimize(prompt_cache=...)``)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable

import torch


class PromptCache:
    """At most ``size`` encodings [L, D] by key (0 turns the cache off), with hit / miss counts in ``stats``."""

    def __init__(self, size: int = 0):
        self.size = size
        self.rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0}

    def resize(self, size: int) -> None:
        self.size = int(size)
        self._trim()

    def _trim(self) -> None:
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)

    def encodings(self, keys: list[tuple], encode: Callable[[list[tuple]], torch.Tensor]) -> torch.Tensor:
        """The encodings of ``keys`` [B, L, D]: the keys not cached are encoded as one batch (``encode(keys)``),
        then kept; every key used becomes the most recent."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        self.stats["misses"] += len(missing)
        self.stats["hits"] += len(keys) - len(missing)
        fresh = dict(zip(missing, encode(missing))) if missing else {}
        rows = []
        for k in keys:
            row = fresh[k] if k in fresh else self.rows[k]
            self.rows[k] = row
            self.rows.move_to_end(k)
            rows.append(row)
        self._trim()
        return torch.stack(rows)  # [B, L, D]
