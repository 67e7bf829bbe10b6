"""The daemon's event stream: every log event, as it goes to the log, to whoever subscribed.

`migratectl events` and the metrics are subscribers. Events are published from any thread (vCPU
and harvester threads log too); each subscription delivers them on the trio thread it was made
on, through a bounded queue: a subscriber that does not keep up loses events (and is told how many)
rather than making the daemon buffer without bound or a vCPU thread wait.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

# Per subscriber: a burst of round and progress events fits; a stalled reader cannot grow it.
MAX_QUEUED = 4096

Event = dict[str, Any]


class Subscription:
    def __init__(self, bus: EventBus, vm: str | None) -> None:
        self._bus = bus
        self._vm = vm
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.get_ident()
        self._send, self._receive = trio.open_memory_channel[Event](MAX_QUEUED)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        """Any thread: queue `event` for this subscriber if it matches its filter."""
        if self._vm is not None and event.get("vm") != self._vm:
            return
        if threading.get_ident() == self._thread:
            self._deliver(event)
            return
        try:
            self._token.run_sync_soon(self._deliver, event)
        except trio.RunFinishedError:
            pass  # the daemon's loop is gone: nobody left to tell

    def _deliver(self, event: Event) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        self._bus._remove(self)
        self._send.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        reported = 0
        async for event in self._receive:
            if self.dropped != reported:
                yield {"event": "events_dropped", "level": "warning", "count": self.dropped - reported}
                reported = self.dropped
            yield event


class EventBus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._listeners: list[Callable[[Event], None]] = []

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """`listener(event)` is called for every event, on the thread that logged it: it must be
        quick and thread-safe (the metrics' counters are)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def subscribe(self, vm: str | None = None) -> Subscription:
        """On the trio thread: a new subscription (close it when done)."""
        subscription = Subscription(self, vm)
        with self._lock:
            self._subscribers.append(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: S110 - a listener's bug must not break logging (nor log again)
                pass
        for subscription in subscribers:
            subscription.offer(event)

    def _remove(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscribers:
                self._subscribers.remove(subscription)

    def __len__(self) -> int:
        """Subscriptions and listeners: 0 means nobody is told, so nothing need be published."""
        with self._lock:
            return len(self._subscribers) + len(self._listeners)

    def subscriptions(self) -> int:
        with self._lock:
            return len(self._subscribers)


# One bus for the process, as there is one log: logs.py publishes every event that passes the
# level filter to it.
BUS = EventBus()


class EventStream:
    """A control-command answer that is a stream: the control server sends each event as a line
    until the client goes away (then the subscription is closed)."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
