"""Progress: tqdm bars on a terminal, plain lines through a pipe."""

import fcntl
import io
import os
import pty
import select
import struct
import termios

from lowcomm.progress import Progress


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress([("all", 10), ("strategy", 5)], stream=out) as p:
        assert not p.tty
        p.update(3)
        p.write("step 3 held-out 2.5")
    assert out.getvalue() == "step 3 held-out 2.5\n"


def test_bars_with_eta_on_a_terminal():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    with os.fdopen(slave, "w") as tty:
        p = Progress([("all", 10), ("strategy", 5)], stream=tty)
        assert p.tty
        p.update(2)
        p.reset("strategy", 5, "diloco")
        p.update(1, bar="strategy")
        p.write("a line above the bars")
        p.close()
        tty.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 65536))
        text = b"".join(chunks).decode(errors="replace")
    os.close(master)
    assert "all" in text and "diloco" in text and "3/10" not in text and "2/10" in text
    assert "a line above the bars" in text and "<" in text  # tqdm's [elapsed<remaining] ETA
