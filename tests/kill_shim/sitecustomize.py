"""Test shim for tests/test_faults.py, active only when PIXELCNN_KILL_AT_STEP is set: the training
process sends itself a real signal (PIXELCNN_KILL_SIGNAL, default SIGKILL) at the end of the first
batch whose optimizer step count reaches that number. The checkpoint callbacks of that
batch have run by then (Lightning calls callbacks before the module's hook), as in a kill that
lands between two steps. Loaded through PYTHONPATH as `sitecustomize`, so the command under test
is the unmodified train.py. Under SLURM: only in the array task PIXELCNN_KILL_TASK (when set), and
not in a job SLURM has requeued (SLURM_RESTART_COUNT set): that one is the run that continues."""

import os
import signal

_AT_STEP = int(os.environ.get("PIXELCNN_KILL_AT_STEP", "0"))
if os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("PIXELCNN_KILL_TASK", "") not in (
        "", os.environ.get("SLURM_ARRAY_TASK_ID")):
    _AT_STEP = 0

if _AT_STEP:
    import pixelcnn.module

    if os.environ.get("PIXELCNN_KILL_SIGNAL") == "SIGINT":
        # Ctrl-C as in a terminal: Python turns SIGINT into KeyboardInterrupt only if it was not ignored
        # when it started, and a command run in the background of a non-interactive shell (as a CI job
        # may be) inherits SIGINT ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _kill_at_step(self, outputs, batch, batch_idx):
        if self.trainer.global_step >= _AT_STEP:
            os.kill(os.getpid(), getattr(signal, os.environ.get("PIXELCNN_KILL_SIGNAL", "SIGKILL")))

    pixelcnn.module.ImageModule.on_train_batch_end = _kill_at_step
