"""The command starter of `commands.run`: a Python that imports torch, Lightning, Hydra and the commands once
(~6 s, most of a tiny run's time), then forks a process per command it is asked to run. Each command is a real
process of its own (its pid, its signals, its exit status), started from these imports instead of a fresh
interpreter's; what a fresh interpreter reads at its start (PYTHON*, OMP_*, ...) `commands.run` gives to a
fresh Python instead.

Run as `python zygote.py SOCKET` by `commands.Starter`; it ends when its stdin closes (the test process ended).
Each connection to SOCKET is one command: a JSON line {argv, cwd, env, stdout, stderr, sitecustomize} in,
then {"pid": ...} and, once the command has ended, {"status": <wait status>} out."""

from __future__ import annotations

import json
import os
import runpy
import selectors
import signal
import socket
import sys

# What the commands import before they parse their arguments (Lightning imports torchmetrics, ~4 s of it).
import lightning.pytorch  # noqa: F401
import torch.utils.tensorboard  # noqa: F401

import pixelcnn.commands.bench
import pixelcnn.commands.evaluate
import pixelcnn.commands.sample
import pixelcnn.commands.train
import pixelcnn.commands.train_classifier
import pixelcnn.training  # noqa: F401


def command(request: dict) -> None:
    """In the forked process: become `python <argv...>` run in `cwd` with `env`, and exit as it does (an
    uncaught exception, KeyboardInterrupt included, propagates to the top as in a fresh interpreter)."""
    import numpy as np

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` puts it first
    np.random.seed()  # a fresh process seeds numpy from the OS (torch's default seed is fixed, as here)
    for shim in request["sitecustomize"]:  # a test's sitecustomize on PYTHONPATH (the kill shim)
        sys.path.insert(1, os.path.dirname(shim))
        runpy.run_path(shim, run_name="sitecustomize")
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def monitor(connection: socket.socket) -> None:
    """In a process forked per connection: start the command, say its pid, wait for it, say its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so that this process can wait for its child
    with connection.makefile("rw") as stream:
        request = json.loads(stream.readline())
        pid = os.fork()
        if pid == 0:
            stream.close()
            connection.close()
            command(request)  # never returns
        stream.write(json.dumps({"pid": pid}) + "\n")
        stream.flush()
        _, status = os.waitpid(pid, 0)
        stream.write(json.dumps({"status": status}) + "\n")
        stream.flush()


def serve(path: str) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the monitors are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    events = selectors.DefaultSelector()
    events.register(server, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            if key.fileobj is sys.stdin:  # readable only at EOF: the test process has gone
                if not sys.stdin.read(1):
                    return
                continue
            connection, _ = server.accept()
            if os.fork() == 0:
                events.close()
                server.close()
                monitor(connection)
                os._exit(0)
            connection.close()


if __name__ == "__main__":
    serve(sys.argv[1])
