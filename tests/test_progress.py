"""Progress where nobody watches a terminal: plain lines now and then, never carriage returns."""
import io
import sys

from mpafer.progress import PlainProgress, progress_bar


def test_plain_progress_prints_whole_lines_now_and_then(capsys):
    bar = PlainProgress(range(3), "epoch 1/2", every=0.0)
    for _ in bar:
        bar.set_postfix(loss="1.250")
    out = capsys.readouterr().out
    assert "\r" not in out and out.splitlines()[-1].startswith("  epoch 1/2: 3/3 (")
    assert out.splitlines()[-1].endswith("loss=1.250")
    quiet = PlainProgress(range(3), "eval")  # a loop shorter than 30 s says nothing
    assert list(quiet) == [0, 1, 2] and capsys.readouterr().out == ""


def test_a_terminal_gets_a_bar_and_a_file_gets_plain_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(range(2), desc="x"), PlainProgress)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not isinstance(progress_bar(range(2), desc="x"), PlainProgress)
    assert list(progress_bar(range(2), desc="x", disable=True)) == [0, 1]
