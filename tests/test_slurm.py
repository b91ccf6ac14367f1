"""A sweep on a real SLURM cluster through `hydra/launcher=slurm` (hydra-submitit-launcher).

The test starts a single-node cluster on localhost from Debian's packages (`munge`, `slurmctld`,
`slurmd`) in a folder of its own: a munge key and socket, a minimal slurm.conf (no accounting,
no cgroups), free ports. It stops exactly the daemons it started when it ends, pass or fail.
It needs root (the daemons run jobs as root here) and the packages, which `.ci/run` installs when
it is root with apt; otherwise it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_cli import NO_QUALITY, ROOT, TINY, data_args, workdir  # noqa: F401 - a fixture
from test_faults import KILL_SHIM, assert_same_training

pytestmark = pytest.mark.xdist_group("slurm")  # one worker runs them all: they share the module's cluster

PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "srun")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # daemons live in sbin


def why_no_slurm() -> str | None:
    """The reason this machine cannot run the test, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root: the test's own SLURM daemons run jobs as root (SlurmUser=root)"
    missing = [name for name in PROGRAMS if shutil.which(name, path=SEARCH_PATH) is None]
    if missing:
        return (f"needs SLURM and munge ({', '.join(missing)} not found): apt-get install slurmctld slurmd munge "
                "(.ci/run does it when root with apt)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    env: dict[str, str]  # what a client (sbatch, squeue, a submitting train.py) needs: SLURM_CONF
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, *args: str) -> None:
        with (self.folder / f"{name}.out").open("w") as log:  # the daemon keeps its own copy of the handle
            self.daemons.append(subprocess.Popen([shutil.which(name, path=SEARCH_PATH), *args], stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True, env=self.env))

    def client(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([shutil.which(args[0], path=SEARCH_PATH), *args[1:]], env=self.env,
                                capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def wait_until(self, what: str, ready, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"{daemon.args[0]} exited ({daemon.returncode}) while waiting for {what}:\n"
                                       + self.logs())
            try:
                if ready():
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.folder.glob("*.out")))

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop the daemons this test started (only those)."""
        if any(d.poll() is None for d in self.daemons[1:]):
            try:
                self.client("scancel", "--user=root", check=False)  # this cluster's jobs: the test's own
                self.wait_until("the jobs to end", lambda: not self.client("squeue", "-h").strip(), timeout=15)
            except RuntimeError:
                pass
        for daemon in reversed(self.daemons):  # slurmd, slurmctld, then munged that they use
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=15)


def slurm_conf(folder: Path, node: str) -> str:
    """One node (this machine, as `slurmd -C` describes it), one partition, no accounting, no cgroups;
    a requeued job may start again after 6 s, not 2 min (cred_expire + 1), and is scheduled within 1 s."""
    return f"""\
ClusterName=pixelcnn-test
SlurmctldHost={node.split()[0].split('=')[1]}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / 'munge' / 'munge.socket'},cred_expire=5
StateSaveLocation={folder / 'state'}
SlurmdSpoolDir={folder / 'spool'}
SlurmctldPidFile={folder / 'slurmctld.pid'}
SlurmdPidFile={folder / 'slurmd.pid'}
SlurmctldLogFile={folder / 'slurmctld.log'}
SlurmdLogFile={folder / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[Cluster]:
    if reason := why_no_slurm():
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="pixelcnn-slurm-"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    (folder / "munge-key").mkdir(mode=0o700)
    (folder / "munge").mkdir()
    os.chmod(folder, 0o755)  # munged wants its socket dir reachable by everyone
    os.chmod(folder / "munge", 0o755)
    key = folder / "munge-key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = subprocess.run([shutil.which("slurmd", path=SEARCH_PATH), "-C"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0]  # NodeName=<host> CPUs=.. RealMemory=..
    (folder / "slurm.conf").write_text(slurm_conf(folder, node))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job of another cluster
    cluster = Cluster(folder, {**env, "SLURM_CONF": str(folder / "slurm.conf")})
    try:
        socket_path = folder / "munge" / "munge.socket"
        cluster.start("munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
                      f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munge-key' / 'seed'}",
                      f"--log-file={folder / 'munged.log'}")
        cluster.wait_until("munged", socket_path.exists)
        cluster.start("slurmctld", "-D", "-f", str(folder / "slurm.conf"))
        cluster.start("slurmd", "-D", "-f", str(folder / "slurm.conf"))
        cluster.wait_until("the node", lambda: cluster.client("sinfo", "-h", "-o", "%T").strip() == "idle")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_sweep_runs_on_slurm_through_the_launcher(slurm_cluster: Cluster, workdir: Path):
    sweep = workdir / "multirun-slurm"
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=5", *TINY, *NO_QUALITY, *data_args(workdir), "trainer.max_epochs=1",
            "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    # The jobs run train.py's task with this interpreter; sbatch passes this environment on (PYTHONPATH too).
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir, capture_output=True,
                            text=True, timeout=240, env={**slurm_cluster.env, "HYDRA_FULL_ERROR": "1"})
    submitit_logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(sweep.glob(".submitit/*/*.err")))
    assert result.returncode == 0, result.stderr[-3000:] + submitit_logs + slurm_cluster.logs()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert [p.name[0] for p in jobs] == ["0", "1"], result.stdout[-2000:] + submitit_logs
    summary = (sweep / "summary.md").read_text()
    assert "optim.lr=0.001" in summary and "optim.lr=0.002" in summary
    for job in jobs:  # each ran as a SLURM task with the one CPU it asked for
        assert re.search(r"job \d: 1 CPU threads .*SLURM_CPUS_PER_TASK=1", (job / "train.log").read_text())
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # submitit's per-job logs, where the README says


def test_a_requeued_sweep_job_continues_in_its_job_dir_bit_for_bit(slurm_cluster: Cluster, workdir: Path):
    """hydra/launcher=slurm: submitit's requeue signal (SIGUSR2, which its sbatch script has SLURM send
    before the time limit, --signal; requeued once: max_num_timeout=1) in the middle of job 0's second epoch. The job saves step.ckpt at
    the next step boundary, submitit requeues it (scontrol requeue) and ends it; SLURM runs it again as
    the same job, in the same job dir, and it continues from that checkpoint: its final weights are
    those of job 1, the same configuration uninterrupted, bit for bit."""
    sweep = workdir / "multirun-requeue"
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=5", "hydra.launcher.max_num_timeout=1", *TINY, *NO_QUALITY,
            *data_args(workdir), "seed=0,0",
            f"hydra.sweep.dir={sweep}"]
    # The kill shim (tests/kill_shim): SIGUSR2 once step 4 of 6 is done, in array task 0 only, not once requeued.
    env = {**slurm_cluster.env, "HYDRA_FULL_ERROR": "1", "PIXELCNN_KILL_AT_STEP": "4", "PIXELCNN_KILL_SIGNAL": "SIGUSR2",
           "PIXELCNN_KILL_TASK": "0", "PYTHONPATH": os.pathsep.join([str(KILL_SHIM), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=workdir, capture_output=True,
                            text=True, timeout=240, env=env)
    logs = {p.name: p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*"))}
    assert result.returncode == 0, result.stderr[-3000:] + "\n".join(logs.values()) + slurm_cluster.logs()
    [stopped, requeued] = [p for p in sweep.iterdir() if p.is_dir() and p.name.startswith(("0_", "1_"))]
    [job_out] = [text for name, text in logs.items() if name.endswith("_0_0_log.out")]  # task 0, both runs of it
    assert "stopped by SIGUSR2 (SLURM requeue) at optimizer step 5" in job_out, job_out[-3000:]
    step_ckpt = stopped / "checkpoints" / "step.ckpt"
    assert f"SLURM requeued this job (SLURM_RESTART_COUNT=1): continuing it from {step_ckpt}" in job_out, job_out[-3000:]
    assert f"Restored all states from the checkpoint at {step_ckpt}" in job_out, job_out[-3000:]  # Lightning's line
    assert_same_training(requeued, stopped)
