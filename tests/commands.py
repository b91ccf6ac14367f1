"""How the tests run a command: `run` starts it in a process of its own, as a user does; `run_here` runs it in this
process, for a command that trains nothing (one refused before it trains, a sweep refused before its jobs,
sample.py and evaluate.py), where a process of its own shows nothing more. The fault tests' kills, signals and
injected failures, and every run that trains, keep a real process: `run` forks it from a Python that has done the
imports (tests/zygote.py), which saves the ~6 s of imports (torch, Lightning, torchmetrics) that were most of a
tiny run's time, and starts a fresh Python where the environment changes what a Python reads as it starts."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout, suppress
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python <script> <args>` in `cwd` with `env` added to this process's: its exit status (-N: killed by
    signal N), stdout and stderr."""
    env = {**os.environ, **QUIET, **(env or {})}
    argv = [str(ROOT / script), *args]
    if (done := STARTER.run(argv, cwd, env)) is not None:
        return done
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# What Python, torch and OpenMP read from the environment as they start: a command run with other values
# than the starter's gets a fresh Python.
READ_AT_START = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "MALLOC_", "CUDA_")


class Starter:
    """tests/zygote.py, which forks `run`'s commands from a Python that has done their imports: one per test
    process (each pytest-xdist worker), started at its first command, ended with it. A process this one forks
    (a test's process pool) uses it too."""

    def __init__(self):
        self.path = self.env = None

    def start(self) -> None:
        folder = tempfile.mkdtemp(prefix="pixelcnn-starter-")
        self.env, path = {**os.environ, **QUIET}, os.path.join(folder, "socket")
        process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py")), path], cwd=folder,
                                   env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if process.stdout.readline().strip() == b"ready":
            self.path = path
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        atexit.register(process.stdin.close)  # first: it exits when its stdin closes

    def shims(self, env: dict) -> list[str] | None:
        """The sitecustomize.py files of the folders `env` puts on PYTHONPATH before the starter's, or None if it
        differs from the starter's otherwise or in anything else read as Python starts (a fresh Python runs it)."""
        if any(env.get(key) != self.env.get(key) for key in {*env, *self.env}
               if key.startswith(READ_AT_START) and key != "PYTHONPATH"):
            return None
        mine, theirs = self.env.get("PYTHONPATH", ""), env.get("PYTHONPATH", "")
        if not theirs.endswith(mine):
            return None
        added = theirs[:len(theirs) - len(mine)].split(os.pathsep)
        shims = [os.path.join(folder, "sitecustomize.py") for folder in added if folder]
        return shims if all(map(os.path.isfile, shims)) else None

    def run(self, argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess | None:
        """The command forked by the starter, or None where it needs a fresh Python."""
        if self.env is None:
            self.start()
        if self.path is None or (shims := self.shims(env)) is None:
            return None
        with tempfile.TemporaryDirectory() as folder, socket.socket(socket.AF_UNIX) as connection:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            out.touch()
            err.touch()
            connection.settimeout(600)
            try:
                connection.connect(self.path)
            except OSError:  # the starter has gone (killed): a fresh Python
                return None
            with connection.makefile("rw") as stream:
                stream.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out),
                                         "stderr": str(err), "sitecustomize": shims}) + "\n")
                stream.flush()
                pid = json.loads(stream.readline())["pid"]
                try:
                    status = json.loads(stream.readline())["status"]
                except TimeoutError:
                    os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(argv, 600) from None
            return subprocess.CompletedProcess([sys.executable, *argv], os.waitstatus_to_exitcode(status),
                                               out.read_text(), err.read_text())


STARTER = Starter()


def run_here(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`run`, in this process: the same exit status, stdout and stderr (an exception that escapes the command is
    exit 1 with its traceback, as Python's would be). What the command changes in the process is put back after,
    as its end would: the environment, the working dir, the files it left open in the temp dir (a run dir's
    lock), signal handlers, warning filters, torch's threads and random state, Hydra's global state and the
    loggers Hydra configures; what it registers with `atexit` runs as it ends. Not for a run that trains
    (Lightning's threads stay): it uses `run`."""
    out, err, code, at_exit = io.StringIO(), io.StringIO(), 0, ExitHandlers()
    environ, loggers, fds, threads = dict(os.environ), logger_states(), open_fds(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        with (pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(), redirect_stdout(out),
              redirect_stderr(err)):
            patch.chdir(cwd)
            patch.setattr(sys, "argv", [str(ROOT / script), *args])
            patch.setattr(atexit, "register", at_exit.register)
            patch.setattr(atexit, "unregister", at_exit.unregister)
            os.environ.update({**QUIET, **(env or {})})
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, int | None):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what Python prints for an uncaught exception, and its status
                traceback.print_exc()
                code = 1
            at_exit.run()
    finally:
        restore_loggers(loggers)  # first: it closes the log files the run opened
        # The run's own files (a lock), not a library's cache (matplotlib's fonts, which stay open for this process:
        # in the venv, itself in the temp dir in a clone there): new descriptors, and numbers that the run closed and
        # opened again (on another file).
        for fd, file in open_fds().items():
            with suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                own = target.startswith(tempfile.gettempdir() + os.sep) and not target.startswith(sys.prefix + os.sep)
                if fds.get(fd) != file and own:
                    os.close(fd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        os.environ.clear()
        os.environ.update(environ)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


class ExitHandlers:
    """`atexit` for one command run in-process: what it registers runs as it ends, as at a process's exit."""

    def __init__(self):
        self.handlers = []

    def register(self, func, *args, **kwargs):
        self.handlers.append((func, args, kwargs))
        return func

    def unregister(self, func) -> None:
        self.handlers = [entry for entry in self.handlers if entry[0] != func]

    def run(self) -> None:
        for func, args, kwargs in reversed(self.handlers):
            func(*args, **kwargs)


def open_fds() -> dict[int, tuple[int, int]]:
    """This process's open file descriptors, each with the (device, inode) of its file (less the one that listed
    them: closed by then)."""
    def file_of(fd: int) -> tuple[int, int] | None:
        try:
            stat = os.fstat(fd)
        except OSError:
            return None
        return stat.st_dev, stat.st_ino
    return {fd: file for fd in map(int, os.listdir("/proc/self/fd")) if (file := file_of(fd)) is not None}


def logger_states() -> dict:
    everyone = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    return {log: (log.level, log.handlers[:], log.filters[:], log.disabled, log.propagate) for log in everyone}


def restore_loggers(states: dict) -> None:
    """Hydra's job logging reconfigures the root logger (and any logger it names) for each run."""
    for log in [logging.root, *logging.root.manager.loggerDict.values()]:
        if not isinstance(log, logging.Logger):
            continue
        for handler in log.handlers:
            if handler not in states.get(log, (0, []))[1]:
                handler.close()  # e.g. the run's log file
        if log in states:
            log.level, log.handlers[:], log.filters[:], log.disabled, log.propagate = states[log]
        else:  # a logger the command created: as a fresh one is
            log.handlers.clear()
            log.filters.clear()
            log.setLevel(logging.NOTSET)
            log.disabled, log.propagate = False, True
