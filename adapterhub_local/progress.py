"""Progress of long jobs that reads well in a terminal and in a log file.

On a TTY a :class:`Progress` draws a tqdm bar; otherwise (output redirected to a log, a CI job, ``nohup``)
it writes a plain line at most every ``every_s`` seconds, plus the first and the last step — never a
bar's carriage-return stream, and never silence for the length of a run::

    train: step 120/1400 (8.6%) · 2.51 s/step · eta 53m34s · elapsed 5m01s · loss=2.31

``train`` drives one from the runner's ``on_step`` callback; the sweep can use one per rank, or one for
the whole plan. Use it as a context manager, or call :meth:`close`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def is_tty(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def duration(seconds: float) -> str:
    """``3725.2`` → ``"1h02m05s"``; ``65`` → ``"1m05s"``; ``4.2`` → ``"4.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts steps of one job and reports them (see the module docstring).

    Args:
        total: steps planned, or ``None`` when unknown (no percentage or eta then).
        desc: what is progressing (``train``, ``sweep r=8``).
        stream: where reports go (default: stderr, so stdout stays clean for ``--json``).
        tty: draw a bar (``True``) or write plain lines (``False``); default: whether ``stream`` is a TTY.
        every_s: seconds between plain lines.
        initial: steps already done (a resumed run); speed is measured from the first update on.
        clock: time source (tests pass a fake one).
        started: when the job began, on ``clock`` (default: now), for the elapsed time.
    """

    def __init__(self, total: int | None, desc: str, *, stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = 30.0, initial: int = 0, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None) -> None:
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_tty(self.stream) if tty is None else tty
        self.every_s = every_s
        self.step = initial
        self._initial = initial
        self._clock = clock
        self._started = clock() if started is None else started
        self._last_line: float | None = None
        self._anchor: tuple[int, float] | None = None
        """(step, time) of the first update: speed is measured from there, not from construction."""
        self._written_step: int | None = None
        self._postfix: dict[str, Any] = {}
        self._bar: Any = None
        self._closed = False
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream, dynamic_ncols=True,
                             disable=False)  # asked for: not subject to $TQDM_DISABLE

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, steps: int = 1, **postfix: Any) -> None:
        """``steps`` more done; ``postfix`` values (loss, tokens/s …) are shown beside the count."""
        self.advance_to(self.step + steps, **postfix)

    def advance_to(self, step: int, **postfix: Any) -> None:
        """The job is at ``step`` now (for callers that know the absolute step, like ``on_step``)."""
        done = step - self.step
        if self._anchor is None:
            self._anchor = (step, self._clock())
        self.step = step
        self._postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(done)
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in self._postfix.items()})
            return
        now = self._clock()
        first = self._last_line is None
        finished = self.total is not None and step >= self.total
        if first or finished or now - (self._last_line or 0.0) >= self.every_s:
            self._write(self.line(now))
            self._last_line, self._written_step = now, step

    def line(self, now: float | None = None) -> str:
        """The plain report for the current step."""
        now = self._clock() if now is None else now
        parts = [f"{self.desc}: step {self.step}" + (f"/{self.total}" if self.total is not None else "")]
        if self.total:
            parts[0] += f" ({100 * self.step / self.total:.1f}%)"
        anchor_step, anchor_time = self._anchor or (self.step, now)
        done, spent = self.step - anchor_step, now - anchor_time
        if done > 0 and spent > 0:
            per_step = spent / done
            parts.append(f"{per_step:.2f} s/step" if per_step >= 1 else f"{1 / per_step:.1f} steps/s")
            if self.total is not None and self.step < self.total:
                parts.append(f"eta {duration(per_step * (self.total - self.step))}")
        parts.append(f"elapsed {duration(now - self._started)}")
        parts += [f"{k}={_short(v)}" for k, v in self._postfix.items()]
        return " · ".join(parts)

    def write(self, message: str) -> None:
        """A message between reports (an evaluation result) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self._write(message)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._written_step is not None and self._written_step != self.step:
            self._write(self.line())  # the last step, even when it came sooner than every_s

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
