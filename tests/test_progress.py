"""Progress bars outside training (mining, guide-cache prefill, evaluation encoding): Lightning's bar
format on a terminal, nothing at all otherwise."""

from __future__ import annotations

import io

import pytest

from gist.infra.progress import progress

pytestmark = pytest.mark.unit


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_a_log_gets_nothing():
    shown, piped = Terminal(), io.StringIO()
    for out in (shown, piped):
        with progress(10, "guide cache", file=out, leave=True) as bar:
            bar.update(10)
    assert "guide cache" in shown.getvalue() and "10/10" in shown.getvalue()
    assert piped.getvalue() == ""


def test_encoding_is_quiet_when_stderr_is_not_a_terminal(tiny_student, capsys):
    from gist.core.encoder import Encoder

    Encoder(str(tiny_student)).encode(["a cat", "a dog"], progress="evaluation")
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
