"""limo.engine.preemption in one process: the handlers, the agreement without a group, a second
signal, the grace time's watchdog, and the handlers put back."""

from __future__ import annotations

import os
import signal
import time

import torch

from limo.engine import preemption
from limo.engine.preemption import PREEMPTED_EXIT, Preemption


def test_a_signal_is_recorded_and_agreed_a_second_changes_nothing_and_the_handlers_come_back(caplog):
    before = signal.getsignal(signal.SIGTERM)
    with Preemption(grace_s=60) as p:
        assert not p.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.signum == signal.SIGTERM and p.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGINT)  # not a KeyboardInterrupt, and still the first signal
        assert p.name == "SIGTERM"
        p._watchdog.cancel()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGINT again: still finishing the step and its save" in caplog.text


def test_past_the_grace_time_the_process_exits_at_once_with_the_preemption_code(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    with Preemption(grace_s=0.2):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
    assert exits == [PREEMPTED_EXIT]
