#!/usr/bin/env python3
"""An event loop in a thread with an fd table of its own: the thread calls unshare(CLONE_FILES),
puts a pipe at fds 40 (read) and 41 (write) of its table and an epoll at fd 44 watching fd 40, and
appends what it reads to HEARD until it has read "END". Its pid goes to PIDFILE, its thread id to
PIDFILE.tid, once all of that is set up.

Usage: thread_epoll.py PIDFILE HEARD
"""
import ctypes
import os
import select
import sys
import threading

CLONE_FILES = 0x400


def loop(pid_path, heard_path):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_FILES) != 0:
        os._exit(2)
    r, w = os.pipe()
    os.dup2(r, 40)
    os.dup2(w, 41)
    os.close(r)
    os.close(w)
    ep = select.epoll()
    os.dup2(ep.fileno(), 44)
    ep.close()
    ep = select.epoll.fromfd(44)
    ep.register(40, select.EPOLLIN)
    with open(pid_path + ".tid", "w") as f:
        f.write(str(threading.get_native_id()))
    with open(pid_path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_path + ".tmp", pid_path)
    heard = b""
    while not heard.endswith(b"END"):
        for _ in ep.poll():
            heard += os.read(40, 4096)
            with open(heard_path, "w") as f:
                f.write(heard.decode())
    os._exit(0)


t = threading.Thread(target=loop, args=(sys.argv[1], sys.argv[2]))
t.start()
t.join()
