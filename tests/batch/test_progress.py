"""The progress bar on a terminal (a real pseudo-terminal): it shows the total and an ETA once the
inputs are counted, not just a running count (``111img [00:06]``)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from tests.support import write_pngs


def _on_a_terminal(*args) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_deploy.cli", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_the_bar_shows_the_total_and_an_eta(tiny_bundle, tmp_path):
    folder = tmp_path / "in"
    write_pngs(folder / "a", 4)
    write_pngs(folder / "b", 3, start=4)
    code, screen = _on_a_terminal("batch", folder, "--model", tiny_bundle, "--out", tmp_path / "r.csv", "-j", "0",
                                  "-b", "2")
    assert code == 0, screen
    final = [part for part in screen.split("\r") if part.startswith("batch")][-1]
    assert "7/7" in final and "100%" in final, final
