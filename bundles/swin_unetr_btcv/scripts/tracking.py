# Copied from common_scripts/tracking.py by ci/sync_scripts.py: edit that file, then run the script.
"""What an MLflow run needs to be reproduced: every public setting as a param, the merged config and the pictures.

`--tracking mlflow` (MONAI's switch) appends MONAI's `MLFlowHandler` to the engines' handlers. On its own it logs
two params (`max_epochs`, `epoch_length`), and its copy of the executed config (`save_execute_config`) cannot be
used here: MONAI resolves `output_dir` for it while the workflow is being built, before `run` puts the bundle's
`scripts` on `sys.path`, so a run started outside the bundle folder fails on `scripts.bundle_root`; and with
`--output_dir` given as plain text it logs the artifact path as the literal text `"<dir> + '/config_...json'"`.
The configs therefore set `save_execute_config` to false, and `describe_mlflow_run` gives the handler (through
its own `experiment_param` and `artifacts` arguments) the settings, a copy of the merged config and the pictures.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.handlers import MLFlowHandler

from .atomic_files import atomic_path

logger = logging.getLogger(__name__)
# the settings section of every config ends where the network definition starts
SETTINGS_END = "network_def"
# a resumed run continues the same MLflow run, which refuses a param whose value changes; these change by design
# (MONAI logs `max_epochs` itself and skips it when already logged)
CHANGE_ON_RESUME = ("resume", "max_epochs")


def running_workflow() -> ConfigWorkflow | None:
    """The `ConfigWorkflow` whose `run` called this function, or None outside one.

    MONAI hands its config parser to none of the objects it builds, and the merged config (config files plus the
    command line's overrides) exists only there, so it is found on the call stack.
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate
        frame = frame.f_back
    return None


def public_settings(parser: ConfigParser) -> dict[str, str]:
    """The resolved values of the config's settings (its top-level items before `network_def`) as text, except
    those a resumed run changes (`CHANGE_ON_RESUME`).

    Args:
        parser: the parser of the running workflow.
    """
    settings = {}
    for key in parser.get():
        if key == SETTINGS_END:
            break
        if key != "imports" and key not in CHANGE_ON_RESUME:
            settings[key] = str(parser.get_parsed_content(key))
    return settings


def export_config(parser: ConfigParser, output_dir: str) -> str:
    """Writes the merged config to `output_dir/config_<date>_<time>.json` (atomically); returns its path.

    Args:
        parser: the parser of the running workflow.
        output_dir: the folder to write to (created if missing).
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"config_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with atomic_path(path) as partial:
        ConfigParser.export_config_file(parser.get(), partial, fmt="json", indent=4)
    return path


def describe_mlflow_run(
    handlers: Sequence[Any],
    output_dir: str,
    artifacts: Sequence[str] = (),
    output_transform: Callable[[Any], Any] | None = None,
) -> None:
    """Gives the first MLflow handler among `handlers` the run's settings as params and, as artifacts, the merged
    config and `artifacts` (and `output_transform`, if given); does nothing when no MLflow handler is attached (no
    `--tracking mlflow`, or a process other than rank 0). Call it before the engine runs: the handler logs params
    when the run starts and artifacts when it completes.

    Args:
        handlers: the engine's handlers (MONAI appends its `MLFlowHandler` to them).
        output_dir: where the copy of the merged config is written.
        artifacts: files or folders (logged recursively) to log when the run completes; missing ones are skipped.
        output_transform: what to log per iteration from the engine's output (a scalar or a dict of them), for an
            engine whose output MONAI's default (`from_engine(['loss'], first=True)`, for decollated output)
            does not read; None keeps the default.
    """
    trackers = [handler for handler in handlers if isinstance(handler, MLFlowHandler)]
    if not trackers:
        return
    tracker = trackers[0]
    workflow = running_workflow()
    if workflow is None:
        logger.warning("MLflow: not run through monai.bundle, so the settings and the config are not logged.")
        config_files: list[str] = []
    else:
        tracker.experiment_param = {**(tracker.experiment_param or {}), **public_settings(workflow.parser)}
        config_files = [export_config(workflow.parser, output_dir)]
    if output_transform is not None:
        tracker.output_transform = output_transform
    tracker.artifacts = tuple(a for a in tracker.artifacts if a) + tuple(config_files) + tuple(artifacts)
