"""Flower's processes never outlive the consortia process that started them."""

import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import sys, time
from pathlib import Path
from consortia.flower_exec import flower_env, start_process
child = start_process([sys.executable, "-c", "import time; time.sleep(120)"],
                      Path(sys.argv[1]), flower_env(Path(sys.argv[2])))
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux's")
def test_a_child_dies_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "log"),
                               str(tmp_path / "home")], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child)
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)  # the test's own session: parent and child
        except ProcessLookupError:
            pass
