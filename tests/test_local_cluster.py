"""The single-node test cluster itself (scripts/slurm/start-local-slurm.sh): its daemons keep none
of the starting process's open files, so a lock or pipe held around the test command is released
when that command ends, not when the cluster stops.

The test restarts the whole cluster (stop, then start as scripts/test.sh does, holding a marker
file open without close-on-exec) and leaves it running for the tests after it. It needs root and
a running cluster; elsewhere it is skipped, unless REQUIRE_SLURM=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPTS = ROOT / "scripts" / "slurm"
HAVE_CLUSTER = shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0
cluster = pytest.mark.skipif(
    (not HAVE_CLUSTER and not os.environ.get("REQUIRE_SLURM")) or os.geteuid() != 0, reason="no local SLURM cluster here"
)
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


def daemons() -> dict[int, str]:
    """pid -> name of every running cluster daemon."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                name = (proc / "comm").read_text().strip()
            except OSError:
                continue
            if name in DAEMONS:
                out[int(proc.name)] = name
    return out


def holders(path: Path) -> list[str]:
    """Every process but this one that holds ``path`` open (a daemon, or a shell the script left)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        pid = int(proc.name)
        try:
            name = (proc / "comm").read_text().strip()
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == str(path):
                    found.append(f"{name} (pid {pid}, fd {fd.name})")
            except OSError:
                continue
    return found


@cluster
def test_cluster_daemons_keep_none_of_their_starters_open_files(tmp_path: Path) -> None:
    marker = tmp_path / "held-by-the-caller"
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT)  # inheritable, as a shell's flock or a harness's pipe
    try:
        stop = subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], capture_output=True, text=True, timeout=180)
        assert stop.returncode == 0, stop.stderr
        start = subprocess.run(
            ["bash", str(SCRIPTS / "start-local-slurm.sh"), "--accounting", "--clean"],
            capture_output=True,
            text=True,
            timeout=600,
            pass_fds=(fd,),
        )
        assert start.returncode == 0, start.stderr[-3000:]
    finally:
        os.close(fd)
    running = set(daemons().values())
    assert {"munged", "slurmctld", "slurmd", "slurmdbd"} <= running, running
    assert holders(marker) == []
    lock = Path("/run/slurm/.start-local-slurm.lock")  # the script's own lock, on its fd 9
    assert not lock.exists() or holders(lock) == []
    assert subprocess.run(["sinfo"], capture_output=True).returncode == 0
