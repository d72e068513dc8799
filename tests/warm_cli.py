"""A warm ``latent-hops`` for the documentation examples' shell blocks.

Each ``latent-hops`` command of an example would start a Python that spends ~5 s importing
torch, transformers and TransformerLens before doing a second of work. Here one server process
imports them once and forks a child per command; the child takes the caller's stdin, stdout,
stderr (passed over a Unix socket), working directory, environment and arguments, runs
``latent_hops.cli.main`` -- what the console script runs -- and sends back its exit status.
test_examples.py checks that it answers as the console script does in a process of its own.

    python tests/warm_cli.py serve SOCKET   # prints "ready" once its imports are done
    python tests/warm_cli.py call SOCKET ARGS...   # what the ``latent-hops`` shim runs
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import traceback


def serve(path: str) -> None:
    """Import the command line once, then fork a child per connection. The server computes
    nothing, so no torch thread pool exists to be broken by the forks."""
    import transformer_lens  # noqa: F401  (what loading a model imports)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import latent_hops.cli  # noqa: F401  (the command line, its analyses, torch, pandas, scipy)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    parent = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen()
    server.settimeout(5)
    print("ready", flush=True)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process died without stopping us
                return
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            server.close()
            _child(conn)
        conn.close()


def _child(conn: socket.socket) -> None:
    """Become the caller's command: its standard streams, directory, environment, arguments."""
    code = 1
    try:
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.argv = ["latent-hops", *request["argv"]]
        from latent_hops.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as stop:  # argparse's --help and usage errors
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # what an uncaught exception prints, then status 1
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(str(code or 0).encode())
        os._exit(0)


def call(path: str, argv: list[str]) -> int:
    """Run ``latent-hops ARGV`` in a child of the server; its exit status."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    answer = conn.recv(64)
    return int(answer) if answer else 1  # no answer: the child died


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(call(sys.argv[2], sys.argv[3:]))
