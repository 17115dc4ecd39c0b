#!/usr/bin/env python3
"""pty_run.py: run a command on a real pseudo-terminal and keep every byte it writes.

Usage: pty_run.py OUT TIMEOUT [--sigint-after SECONDS] -- COMMAND...

The command's stdin, stdout and stderr are the slave side of a new pty (so isatty() is true and
TERM-less escape sequences are what a terminal would get); everything it writes is copied to OUT.
With --sigint-after, SIGINT is sent to the command after SECONDS (as Ctrl-C would be). After
TIMEOUT seconds the command is killed (SIGKILL) and the exit status is 124. Otherwise the exit
status is the command's (128+N when killed by signal N).
"""
import os
import pty
import select
import signal
import sys
import time


def main():
    args = sys.argv[1:]
    out_path, timeout = args[0], float(args[1])
    args = args[2:]
    sigint_after = None
    if args[0] == "--sigint-after":
        sigint_after = float(args[1])
        args = args[2:]
    assert args[0] == "--", "usage: pty_run.py OUT TIMEOUT [--sigint-after S] -- COMMAND..."
    cmd = args[1:]
    pid, master = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    start = time.monotonic()
    data = bytearray()
    sent = False
    status = None
    while True:
        now = time.monotonic() - start
        if sigint_after is not None and not sent and now >= sigint_after:
            os.kill(pid, signal.SIGINT)
            sent = True
        if now >= timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = 124
            break
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed, the command has exited
                chunk = b""
            if chunk:
                data += chunk
                continue
            _, st = os.waitpid(pid, 0)
            status = os.waitstatus_to_exitcode(st)
            status = 128 - status if status < 0 else status
            break
    with open(out_path, "wb") as f:
        f.write(data)
    sys.exit(status)


if __name__ == "__main__":
    main()
