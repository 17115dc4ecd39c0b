# asyncio_reader.py: a real event loop (Python asyncio, epoll underneath) that reads a pipe through
# loop.add_reader, for tests/cli/links.bats. It makes a pipe (read end at fd 40, write end at 41),
# writes its pid to $1, then appends everything the loop hears on the pipe to $2 and exits 0 once
# it has heard "END". A restore that replaces the pipe must add the loop's epoll watch again on the
# new one, else the loop never hears another byte.
import asyncio
import os
import sys


def main():
    r, w = os.pipe()
    os.dup2(r, 40)
    os.dup2(w, 41)
    os.close(r)
    os.close(w)
    os.set_blocking(40, False)
    heard = bytearray()
    loop = asyncio.new_event_loop()
    done = loop.create_future()

    def on_readable():
        try:
            data = os.read(40, 65536)
        except BlockingIOError:
            return
        heard.extend(data)
        with open(sys.argv[2], "ab") as f:
            f.write(data)
        if b"END" in heard and not done.done():
            done.set_result(None)

    loop.add_reader(40, on_readable)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    loop.run_until_complete(asyncio.wait_for(done, timeout=60))
    sys.exit(0)


main()
