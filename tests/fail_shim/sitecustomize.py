"""Test shim for tests/test_faults.py, active only when PIXELCNN_FAIL_AT is set to `module:attribute`
(e.g. `pixelcnn.training:build_loggers`, `lightning.Trainer.fit`: dots after the colon walk into a
class): that function then raises RuntimeError("injected failure"), as an unforeseen bug there would.
Loaded through PYTHONPATH as `sitecustomize`, so the command under test is the unmodified script."""

import importlib
import os

if target := os.environ.get("PIXELCNN_FAIL_AT"):
    module_name, _, path = target.partition(":")
    *parents, name = path.split(".")
    owner = importlib.import_module(module_name)
    for parent in parents:
        owner = getattr(owner, parent)

    def _fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {target}")

    setattr(owner, name, _fail)
