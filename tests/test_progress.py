"""Progress reports: plain lines in logs (first step, then at most every ``every_s`` seconds, and the last
step), speed measured from the first update, no bar characters; a bar on a TTY."""

from __future__ import annotations

import io

from adapterhub_local.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_periodic_and_include_the_first_and_last_step() -> None:
    out, clock = io.StringIO(), Clock()
    with Progress(100, "train", stream=out, tty=False, every_s=30, clock=clock) as progress:
        clock.now += 50  # model loading: not part of the speed
        for _ in range(100):
            clock.now += 2.0
            progress.update(loss=0.5)
    lines = out.getvalue().splitlines()
    # step 1, then every 15 steps (30 s at 2 s/step), then the last one.
    assert [line.split()[2] for line in lines] == ["1/100", "16/100", "31/100", "46/100", "61/100", "76/100",
                                                   "91/100", "100/100"]
    assert "2.00 s/step" in lines[1] and "eta 2m48s" in lines[1] and "loss=0.5" in lines[1]
    assert "\r" not in out.getvalue()


def test_the_last_step_is_reported_even_without_a_total() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(None, "sweep", stream=out, tty=False, every_s=30, clock=clock)
    for _ in range(3):
        clock.now += 1
        progress.update()
    progress.close()
    progress.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["sweep: step 1", "sweep: step 3"]
    assert "eta" not in out.getvalue() and "%" not in out.getvalue()


def test_a_resumed_run_counts_from_where_it_resumed() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(10, "train", stream=out, tty=False, every_s=0, initial=6, clock=clock)
    progress.advance_to(6)
    clock.now += 4
    progress.advance_to(8)
    assert "2.00 s/step" in out.getvalue().splitlines()[-1] and "eta 4.0s" in out.getvalue()


def test_a_tty_gets_a_bar_and_messages_do_not_break_it() -> None:
    out = io.StringIO()
    with Progress(4, "train", stream=out, tty=True) as progress:
        progress.update(2, loss=1.0)
        progress.write("step 2: val_loss=1.0")
    text = out.getvalue()
    assert "\r" in text and "step 2: val_loss=1.0" in text and "train" in text


def test_durations() -> None:
    assert duration(4.24) == "4.2s" and duration(65) == "1m05s" and duration(3725.2) == "1h02m05s"


def test_reaching_the_total_reports_at_once_without_waiting_for_close() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(3, "train", stream=out, tty=False, every_s=1000, clock=clock)
    for _ in range(3):
        clock.now += 1
        progress.update()
    assert [line.split(" · ")[0] for line in out.getvalue().splitlines()] == ["train: step 1/3 (33.3%)",
                                                                              "train: step 3/3 (100.0%)"]


def test_elapsed_counts_from_when_the_job_began() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(10, "train", stream=out, tty=False, clock=clock, started=clock.now - 90)
    progress.advance_to(1)
    assert "elapsed 1m30s" in out.getvalue()
