"""alignd/flower.py: the first interrupt stops Flower, later ones are ignored without ever installing SIG_IGN."""

import signal

import pytest

from alignd import flower


def test_the_first_interrupt_exits_and_later_ones_are_ignored_by_a_python_handler(monkeypatch):
    monkeypatch.setattr(flower, "_stopping", False)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, flower._stop_once)
        with pytest.raises(SystemExit) as stop:
            flower._stop_once(signal.SIGINT, None)
        assert stop.value.code == 0
        # a second Ctrl-C (the terminal's and the forwarded one) or a SIGTERM during shutdown: nothing happens
        assert flower._stop_once(signal.SIGINT, None) is None
        assert flower._stop_once(signal.SIGTERM, None) is None
        # SIG_IGN set while an interrupt is pending makes CPython print "Signal 2 ignored due to race condition"
        assert signal.getsignal(signal.SIGINT) is flower._stop_once
        assert signal.getsignal(signal.SIGTERM) is flower._stop_once
    finally:
        for s, h in before.items():
            signal.signal(s, h)
