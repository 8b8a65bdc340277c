"""Progress bars in a log file: whole lines at an interval, never carriage-return redraws."""

import io

from limo.tools import progress
from limo.tools.progress import progress_bar


def test_a_bar_written_to_a_file_prints_whole_lines_at_an_interval(monkeypatch):
    log = io.StringIO()  # not a terminal
    bar = progress_bar(500, "train", "step", stream=log)
    for i in range(500):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the start, perhaps one interval, the end: not 500 redraws
    assert "500/500" in lines[-1] and "loss=0.0020" in lines[-1]


def test_the_interval_sets_how_often_a_line_is_written(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    log = io.StringIO()
    bar = progress_bar(5, "gen", "sample", stream=log)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) >= 5 and "\r" not in log.getvalue()


def test_a_terminal_gets_the_in_place_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    screen = Tty()
    bar = progress_bar(3, "train", "step", stream=screen)
    bar.update(3)
    bar.close()
    assert "\r" in screen.getvalue()
