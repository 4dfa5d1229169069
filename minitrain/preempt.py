"""Preemption: SIGTERM (what schedulers and spot instances send) or SIGINT (Ctrl-C) asks a run to
stop after the step it is in, with a checkpoint; a second signal stops it at once.

While `StopRequests` is entered, the first signal is only noted (`signum`); the training loop
looks after each step, and every rank agrees (dist gather: the first step at which any rank has
one), so that under mpiexec, which forwards the signal to each rank at its own moment, all stop
after the same step. The run then raises Preempted, which the command turns into exit
128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
"""

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal, with a checkpoint: exit 128 + signum."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.code = 128 + signum


class StopRequests:
    """A context in which SIGTERM and SIGINT are noted, not obeyed (in the main thread only:
    elsewhere Python cannot catch signals, and nothing changes)."""

    def __init__(self, say):
        self.signum, self.say, self.previous = None, say, {}  # say: how the run prints a line

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        except ValueError:  # not the main thread
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _note(self, signum, frame):
        if self.signum is not None:  # the second: as if no handler had been set
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.say(f"minitrain: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
                 f"(send it again to stop at once)")
