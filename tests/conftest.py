"""Suite-wide: tests never read or write the user's data dir (~/.cache/pixelcnn or
$PIXELCNN_DATA_DIR). Commands run by the tests inherit a fresh one for the session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_data_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(os.environ, "PIXELCNN_DATA_DIR", str(tmp_path_factory.mktemp("pixelcnn-data")))
        yield
