"""Test-only pause point for the kill/resume tests (never installed; a child process gets it by having
this folder first on its PYTHONPATH, see `conftest.pausing_env`).

With ``BASTION_TEST_PAUSE="N:PATH"`` set, the first append (`bastion.records.LineLog.append_lines`) that
leaves the log at PATH with at least N lines writes ``PATH.paused`` (holding this process's id) and
then sleeps until the test kills the process. The run is thereby stopped at a known point, mid-run,
however fast or slow the machine: the kill tests wait for the marker instead of racing the run.
Without the variable this module does nothing."""

import os

_SPEC = os.environ.get("BASTION_TEST_PAUSE")

if _SPEC:
    import time
    from pathlib import Path

    from bastion.records import LineLog

    _n, _path = _SPEC.split(":", 1)
    _AT, _TARGET = int(_n), os.path.realpath(_path)
    _original = LineLog.append_lines

    def _append_then_pause(self, lines):
        written = _original(self, lines)
        if os.path.realpath(self.path) == _TARGET and len(self.path.read_bytes().splitlines()) >= _AT:
            tmp = Path(_TARGET + ".paused.tmp")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, _TARGET + ".paused")
            while True:
                time.sleep(60)
        return written

    LineLog.append_lines = _append_then_pause
