"""A rank's last step: its exit code, exit handlers, running threads and buffered output all survive the exit
that skips interpreter finalization (hfhpc.recipes.run.exit_rank)."""

import subprocess
import sys

CHILD = """
import atexit, sys, threading, time
from pathlib import Path
from hfhpc.recipes import run

atexit.register(lambda: Path(sys.argv[1]).write_text("handlers ran"))
late = threading.Thread(target=lambda: (time.sleep(0.3), Path(sys.argv[2]).write_text("thread done")))
late.start()  # not a daemon: a normal exit waits for it
sys.stdout.write("saved, no newline")  # still in the buffer of a pipe when the rank exits
run.exit_rank(3)
"""


def test_exit_rank_keeps_code_handlers_threads_and_output(tmp_path):
    marker, thread = tmp_path / "marker", tmp_path / "thread"
    out = subprocess.run([sys.executable, "-c", CHILD, str(marker), str(thread)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout == "saved, no newline"
    assert marker.read_text() == "handlers ran"
    assert thread.read_text() == "thread done"
