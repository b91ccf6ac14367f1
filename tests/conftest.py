"""Suite-wide: tests never read or write the user's data dir (~/.cache/pixelcnn or
$PIXELCNN_DATA_DIR). Commands run by the tests inherit a fresh one for the session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_data_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(os.environ, "PIXELCNN_DATA_DIR", str(tmp_path_factory.mktemp("pixelcnn-data")))
        yield


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist each worker trains in-process with one torch thread: two workers, each with a thread
    per core, beside the commands the other runs, oversubscribe the cores (OpenMP spin-waits): the real-data
    test took 164 s in the suite and 14 s alone. The commands a worker starts run with OMP_NUM_THREADS=1 for the same
reason."""
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with pytest.MonkeyPatch.context() as patch:  # and the commands it starts: one thread each, unless a test says
            patch.setitem(os.environ, "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
            yield
        torch.set_num_threads(threads)
    else:
        yield
