"""Stop-signal handlers: the first signal is only noted, a second one is not waited for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ddp_trainer.preemption import StopSignals


def test_first_signal_is_noted_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGUSR2)
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_a_second_signal_ends_the_process():
    code = (
        "import os, signal, time\n"
        "from ddp_trainer.preemption import StopSignals\n"
        "stop = StopSignals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('noted', stop.received, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('still alive')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == f"noted {int(signal.SIGTERM)}"
    assert result.returncode == -signal.SIGTERM
