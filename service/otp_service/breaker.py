"""A circuit breaker in front of Interakt: stop calling an upstream that keeps failing.

After ``failures`` upstream failures in a row the circuit opens: for ``cooloff_seconds`` every
send is refused at once (``CircuitOpen``, UNAVAILABLE) instead of queueing callers behind a
dead upstream. Then it is half open: one trial call goes through; its success closes the
circuit, its failure opens it again. What counts as a failure is the caller's to say (the
sender: timeouts, connection errors, 5xx); an upstream that answers, even with a refusal or a
429, is alive, and a call cut short by its caller's own deadline says nothing either way (one
caller's short deadline must not open the circuit for every caller). The state is per process
(each replica and worker learns on its own), kept in ``otp_interakt_circuit_state`` and logged
at each change.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Iterator

from otp_service import metrics
from otp_service.errors import CircuitOpen

log = logging.getLogger(__name__)

# What a call refused while the trial is in flight is told to wait: the trial ends within one
# delivery budget, usually far sooner.
_TRIAL_WAIT_SECONDS = 1.0


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive upstream failures and refuses calls while the circuit is open."""

    def __init__(
        self,
        *,
        failures: int,
        cooloff_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._cooloff = cooloff_seconds
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._trial = False  # a trial call is in flight (half open)
        self.state = State.CLOSED
        metrics.circuit_state(self.state.value)

    def check(self) -> None:
        """Raise CircuitOpen when a call now would be refused; claims nothing.

        For refusing before any work is done; ``call`` decides for the call itself.
        """
        wait = self._refusal()
        if wait is not None:
            raise self._open(wait)

    @contextlib.contextmanager
    def call(self, failed: Callable[[BaseException], bool | None]) -> Iterator[None]:
        """Around one upstream call: refused (CircuitOpen) while open, its outcome counted.

        ``failed`` says whether an exception the call raised is the upstream's failure (True),
        an answer (False: the upstream is alive), or says nothing of the upstream (None: the
        caller's own deadline cut it short). A call that says nothing, or is cancelled, counts
        for nothing: the failures in a row stay as they were, and a trial it was is given back
        for the next call to make.
        """
        wait = self._refusal()
        if wait is not None:
            raise self._open(wait)
        trial = self.state is State.HALF_OPEN
        self._trial = self._trial or trial
        try:
            yield
        except Exception as exc:
            verdict = failed(exc)
            if verdict is None:
                self._give_back(trial)
            else:
                self._settle(failed=verdict, trial=trial)
            raise
        except BaseException:
            self._give_back(trial)
            raise
        self._settle(failed=False, trial=trial)

    def _give_back(self, trial: bool) -> None:
        if trial:
            self._trial = False

    def _refusal(self) -> float | None:
        """Seconds to wait if a call now is refused; None when it may go (moving an open
        circuit whose cool-off is over to half open)."""
        if self.state is State.OPEN:
            wait = self._open_until - self._clock()
            if wait > 0:
                return wait
            self._change(State.HALF_OPEN)
        if self.state is State.HALF_OPEN and self._trial:
            return _TRIAL_WAIT_SECONDS
        return None

    def _settle(self, *, failed: bool, trial: bool) -> None:
        if trial:
            self._trial = False
        if not failed:
            self._failures = 0
            if self.state is not State.CLOSED:
                self._change(State.CLOSED)
            return
        self._failures += 1
        # A failed trial opens it again at once; a call that was in flight when it opened
        # changes nothing.
        if trial or (self.state is State.CLOSED and self._failures >= self._threshold):
            self._open_until = self._clock() + self._cooloff
            self._change(State.OPEN)

    def _change(self, state: State) -> None:
        self.state = state
        metrics.circuit_state(state.value)
        if state is State.OPEN:
            log.warning(
                "interakt circuit open: %d failures in a row; sends are refused for %ss",
                self._failures,
                self._cooloff,
                extra={"event": "interakt_circuit", "state": state.value},
            )
        else:
            log.info(
                "interakt circuit %s",
                "half open: the next send is a trial" if state is State.HALF_OPEN else "closed",
                extra={"event": "interakt_circuit", "state": state.value},
            )

    def _open(self, wait: float) -> CircuitOpen:
        return CircuitOpen(
            f"the message provider failed {self._threshold} times in a row, so sends are paused "
            f"for {math.ceil(wait)} s more; nothing was sent",
            retry_after=wait,
        )
