"""Circuit breakers around model versions that keep failing, in one process (pybreaker's state machine).

A circuit opens after a model version's `breaker_failures` failures in a row, refuses for `breaker_reset_s`,
then lets requests through again: the first to succeed closes it, the first to fail opens it once more.
pybreaker's `call` holds the breaker's lock while the guarded function runs, which would serialise every
prediction of a model; so a prediction runs outside it, and only its outcome goes through `call` afterwards,
which updates the counts and the state under the lock in microseconds.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading

import pybreaker

log = logging.getLogger(__name__)


class Circuit:
    """The breaker of one model version (or one ensemble member) in this process."""

    def __init__(self, name: str, failures: int, reset_s: float):
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self.breaker = pybreaker.CircuitBreaker(fail_max=failures, reset_timeout=reset_s, state_storage=self.storage,
                                                listeners=[Changes()], name=name)

    @property
    def state(self) -> str:
        """`closed`, `open` or `half-open`."""
        return self.breaker.current_state

    def retry_after(self) -> float:
        """Seconds the circuit still refuses; 0 when it lets requests through (closed, or its wait is over)."""
        opened = self.storage.opened_at
        if self.breaker.current_state != pybreaker.STATE_OPEN or opened is None:
            return 0.0
        reopens = opened + datetime.timedelta(seconds=self.breaker.reset_timeout)
        return max(0.0, (reopens - datetime.datetime.now(datetime.UTC)).total_seconds())

    def succeeded(self) -> None:
        """Count a run that succeeded: it closes a circuit whose wait is over."""
        with contextlib.suppress(pybreaker.CircuitBreakerError):  # a run that began before the circuit opened
            self.breaker.call(_nothing)

    def failed(self, exc: Exception) -> None:
        """Count a run that failed with `exc`: the last of `failures` in a row opens the circuit."""
        with contextlib.suppress(pybreaker.CircuitBreakerError, type(exc)):
            self.breaker.call(_raise, exc)


class Circuits:
    """The circuits of this process by key, each made on first use."""

    def __init__(self) -> None:
        self.circuits: dict[str, Circuit] = {}
        self.lock = threading.Lock()

    def get(self, key: str, failures: int, reset_s: float) -> Circuit:
        """The circuit named `key`, made with these settings the first time."""
        circuit = self.circuits.get(key)
        if circuit is None:
            with self.lock:
                circuit = self.circuits.setdefault(key, Circuit(key, failures, reset_s))
        return circuit


class Changes(pybreaker.CircuitBreakerListener):
    """Log each circuit's changes of state."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        """Log the change: a warning when the circuit opens."""
        level = logging.WARNING if new_state.name == pybreaker.STATE_OPEN else logging.INFO
        log.log(level, "circuit %s: %s -> %s", cb.name, old_state.name if old_state else None, new_state.name)


def _nothing() -> None:
    return None


def _raise(exc: Exception) -> None:
    raise exc
