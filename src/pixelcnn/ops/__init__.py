"""The ops wing: what keeps runs safe and repeatable around the lab (the networks, sampler, likelihood,
LightningModule, data module and `train()` at the package's top level). Each room holds one concern:

    errors       UserError and the one-line report of any failure
    rules        every config value's check (`validate`), once, where the config becomes final
    run_dirs     run and sweep dirs: reserved atomically, locked, found again on a resume
    final_config train.py's config completed once (`complete`): a resume's, a requeued job's, paths, sweep names
    checkpoints  find, read (weights_only) and check checkpoints; load a trained model
    callbacks    a training run's Lightning callbacks: sample grids, step checkpoints, preemption, RNG states,
                 EMA, the run-time estimate
    files        every write whole or not at all (JSON with null for NaN: every metrics.json, bench.json)
    datafiles    IDX files, the data dir and its cache;  sources: image folders and arrays;  images: image files
    resources    threads and GPU of a job that shares the machine; what fits the device; the `auto` speed choices
    reports      a run's loggers, what it logs there, its console lines
    sweep, sweep_check   a sweep's summary of its jobs' metrics.json; every job checked before any runs

The lab imports this package only as `pixelcnn.ops`, and only the names of SEAM (the one narrow seam);
each is loaded on first use, so that a command that needs little (sample.py) imports little.
"""

from importlib import import_module

# ops module -> the names the lab takes from it (tests/test_layout.py reads this table for the import graph)
SEAM = {
    "errors": ("raised_in", "UserError"),
    "rules": ("as_override", "validate"),
    "callbacks": ("STOPPED_EXIT_CODE", "AtomicCheckpointIO", "build_callbacks", "StepCheckpoint"),
    "checkpoints": ("read_checkpoint", "read_same_network"),
    "resources": ("check_model_fits", "claim_job_resources", "cuda_device_args", "planned_steps", "resolve_speed",
                  "say", "SpeedChoices"),
    "reports": ("build_loggers", "log_failure", "report_end", "report_start"),
    "run_dirs": ("run_dir_of",),
    "datafiles": ("default_data_dir", "IDX_DATASETS", "load_data"),
}
OWNER = {name: module for module, names in SEAM.items() for name in names}  # name -> the module that defines it


def __getattr__(name: str):
    if name not in OWNER:
        raise AttributeError(f"pixelcnn.ops has no {name!r} for the lab (its seam: pixelcnn.ops.SEAM)")
    return getattr(import_module(f"{__name__}.{OWNER[name]}"), name)
