"""Cancels that arrive before their request: the broker still holds it, behind the device session's full window.

Flow control (mqtt_waiting.py) lets the broker keep what the queue cannot take, and cancels travel at QoS 0 beside
that window, so a requester's cancel can reach the appliance before the request it names. Such a cancel is kept for
a while (``worker.request_timeout``, at most :data:`LIMIT` of them) and applied when the request arrives: it is
answered ``cancelled`` at once, with no token generated. A kept cancel that stops a request already here is dropped
then, so a later request that reuses the id is not touched.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from appliance.generation.jobs import Requester

#: kept cancels at most; the oldest goes first
LIMIT = 1024


class EarlyCancels:
    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()  # paho's thread keeps and takes; the scheduler's thread forgets
        self._kept: OrderedDict[tuple[str | int, Requester], float] = OrderedDict()

    def keep(self, rid: str | int, requester: Requester) -> None:
        with self._lock:
            self._kept[(rid, requester)] = time.monotonic() + self._ttl
            self._kept.move_to_end((rid, requester))
            while len(self._kept) > LIMIT:
                self._kept.popitem(last=False)

    def take(self, rid: str | int, requester: Requester) -> bool:
        """Whether a kept cancel names this arriving request; it is used up."""
        with self._lock:
            until = self._kept.pop((rid, requester), None)
        return until is not None and until > time.monotonic()

    def forget(self, rid: str | int, requester: Requester) -> None:
        """The cancel found its request after all."""
        with self._lock:
            self._kept.pop((rid, requester), None)
