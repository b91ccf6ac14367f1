"""Where runs write: run and sweep folder names (the Hydra resolvers of conf/train.yaml), folders
that cannot collide, the lock that keeps a second run out of a run dir, and the rule that only a
run's own folder is removed.

Hydra's `${now:...}` names alone collide within a second: `fresh_dir` reserves a name with one
atomic `mkdir` (`os.makedirs` fails if the name exists). A directory reserved here, or one that did
not exist when the run started, is this run's own: only such a directory may be removed after an
input error (`remove_own_dir`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import suppress
from pathlib import Path

from omegaconf import OmegaConf

from pixelcnn.ops.rules import as_override, check_out_dir

from pixelcnn.ops.errors import UserError
from pixelcnn.ops.files import missing_dirs, remove_if_empty

# Directories this process created for its run (absolute paths), and the missing parents created with them.
_CREATED: set[Path] = set()
_CREATED_PARENTS: list[Path] = []
# Free space a run dir's disk must have, checked before Hydra writes its record there (which it
# cannot report in one line): the record and logs take ~10 kB, the smallest checkpoint ~30 kB.
MIN_RUN_DIR_FREE = 2**20
# Every suffix up to this is tried before giving up (a loop on a full or read-only disk must end).
MAX_SUFFIX = 1000


def fresh_dir(base: str) -> str:
    """Reserve `base`, else `base_1`, `base_2`, ... by creating it, and return its path: the caller
    then owns it for certain, even against other processes. Also the Hydra resolver of the sweep
    dir (registered with use_cache=True: resolved once, and Hydra copies the cache into every job's
    config, so all jobs of a sweep get the same dir)."""
    base_path = Path(base)
    with suppress(OSError):  # an unwritable parent or disk: RunDirGuard reports it in one line
        _CREATED_PARENTS.extend(missing_dirs(base_path.resolve().parent))
        for suffix in range(MAX_SUFFIX):
            candidate = base_path if suffix == 0 else base_path.with_name(f"{base_path.name}_{suffix}")
            with suppress(FileExistsError):  # taken: try the next suffix
                os.makedirs(candidate)  # its parents as needed; the name itself only if it is new
                _CREATED.add(candidate.resolve())
                return str(candidate)
    return base


def remove_own_dir(path: str | Path) -> None:
    """After an error: remove `path` if it is this run's own, a dir this process created for its run (removing it
    deletes nothing anyone else wrote), and the parents created for it that are now empty, e.g. outputs/<date>/ of
    a first run that failed."""
    if Path(path).resolve() in _CREATED:
        shutil.rmtree(path, ignore_errors=True)
        # Only the empty ones: another run may have put its dir there meanwhile.
        remove_if_empty(sorted(_CREATED_PARENTS, key=lambda p: len(p.parts), reverse=True))


def check_run_dir(path: Path, key: str, resuming: bool) -> None:
    """Refuse a run dir that is not a resume but already holds files, or cannot be written;
    a dir that does not exist yet will be created by this run, so it is marked as its own."""
    check_out_dir(path, key)  # also refuses a file
    existing = next(p for p in (path, *path.parents) if p.exists())
    if (free := shutil.disk_usage(existing).free) < MIN_RUN_DIR_FREE:
        raise UserError(f"{key}={path} is on a disk with {free // 1024} kB free, less than a run needs to start: "
                        "free some space there or pass a folder on another disk")
    if not resuming and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{key}={path} already holds files (an earlier run?): pass a new folder, or resume that "
                        f"run with {as_override('ckpt_path', path)}")
    claim_if_new(path)


def claim_if_new(path: Path) -> None:
    """A dir that does not exist yet will be created by this run: mark it as its own."""
    if not path.exists():
        _CREATED_PARENTS.extend(missing_dirs(path.resolve().parent))
        _CREATED.add(path.resolve())


class RunDirInUse(UserError):
    """The run dir is locked by another process: nothing may be written into it, not even a failure record."""


def hold_run_dir(path: Path, name: str) -> int:
    """Lock the run dir `path` (`name`: how a refusal calls it, e.g. `ckpt_path=<path>`) until the
    returned descriptor is closed or the process ends, or refuse it in one line if another process
    holds it. An flock (not filelock.FileLock, which truncates the file: a resume refused or with
    nothing left to do must change nothing) on `path/.lock`, which holds the pid of the process training in
    `path` and which the OS releases when its holder ends in any way, SIGKILL included: a killed run never leaves
    its dir locked. A `.lock` that is a symbolic link (in a copied run dir) is refused, never followed: the pid
    would be written into the file it points to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # a link is refused (ELOOP)
    except OSError as err:
        raise UserError(f"{name} cannot be locked for this run ({err.filename}: {err.strerror}): pass a writable "
                        "folder, whose .lock (if any) is a plain file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another process
        holder = os.read(fd, 20).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise RunDirInUse(f"{name} is in use: another train.py{pid} is training in it; wait until it ends or "
                        "stop it (two runs in one run dir would mix their checkpoints and logs)") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def requeued_job() -> bool:
    """Whether SLURM started this process again as the same job (SLURM_RESTART_COUNT >= 1: after
    `scontrol requeue`, from Lightning's or submitit's requeue handler, or a preemption or node failure
    of a job with --requeue): it is to continue in the dir of its first start, from its checkpoint."""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


def run_dir_of(ckpt_path: str | Path) -> str | None:
    """The run dir a checkpoint path belongs to (a run dir, its checkpoints/ or a file in it), or None."""
    path = Path(ckpt_path)
    if path.is_dir():
        return str(path.parent if path.name == "checkpoints" else path)
    return str(path.parent.parent) if path.parent.name == "checkpoints" else None


def resume_run_dir(ckpt_path: str | None, default: str) -> str:
    """Hydra resolver: a resumed run writes into the run dir its checkpoint came from; any other
    run into `default`, which `final_config.complete` then reserves (`fresh_dir`: with a suffix
    if another run took the name). No side effect here: OmegaConf also evaluates a value that a
    config merge replaces (bench.yaml's run dir), and that must not create a folder."""
    return (run_dir_of(str(ckpt_path)) if ckpt_path else None) or default  # str: ckpt_path=3 is an int


def resume_output_subdir(ckpt_path: str | None, stamp: str) -> str:
    """Hydra resolver: where a run's resolved config goes. A resumed run must not overwrite the
    `.hydra/` of the run it continues (it is that run's record), so it gets a sub-dir."""
    return f".hydra/resume-{stamp}" if ckpt_path else ".hydra"


def sweep_subdir(job_num: int, override_dirname: str) -> str:
    """Hydra resolver: a sweep job's folder, named by its swept overrides (`final_config.complete`), cut
    (with a hash to stay unique) past 120 characters, well within a file name's length limit."""
    if len(override_dirname) <= 120:
        return f"{job_num}_{override_dirname}" if override_dirname else str(job_num)
    return f"{job_num}_{override_dirname[:120]}..{hashlib.sha1(override_dirname.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    """Make the resolvers above known to OmegaConf, before Hydra composes a config that uses them."""
    # use_cache: a sweep dir is reserved once per config (Hydra copies the cache into each job's config).
    for resolver in (resume_run_dir, fresh_dir, resume_output_subdir, sweep_subdir):  # replace: bench.py registers too
        OmegaConf.register_new_resolver(resolver.__name__, resolver, use_cache=resolver is fresh_dir, replace=True)
