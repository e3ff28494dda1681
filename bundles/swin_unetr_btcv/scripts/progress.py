# Copied from common_scripts/progress.py by ci/sync_scripts.py: edit that file, then run the script.
"""A progress bar over the whole run, on a terminal only.

ignite's `ProgressBar` counts the current epoch only, so its time left is the epoch's; it is created at the first
iteration, so it shows no estimate until the second; log lines are written onto the bar's line; and a validation
run inside training shows nothing. `RunProgress` counts every iteration of the run (a resumed run starts where the
checkpoint left off), shows a second bar while the validator runs, and sends console log lines through
`tqdm.write` while a bar is open, so they print above it. Like tqdm, it draws only when its stream is a terminal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def _console_loggers() -> list[logging.Logger]:
    """The root logger and every other logger with a handler of its own (all may print to the console)."""
    named = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    return [logging.root] + [logger for logger in named if logger.handlers]


class RunProgress:
    """Attaches a progress bar over all iterations of an engine's run, and one over each run of `validator`.

    Args:
        loss: reads the loss from the engine's output (shown beside the bar), or None to show none.
        validator: the evaluator a `ValidationHandler` runs during training, or None.
        desc: the label of the main bar.
        disable: True hides the bars; None (default) shows them when the output is a terminal.
    """

    def __init__(
        self,
        loss: Callable[[Any], Any] | None = None,
        validator: Engine | None = None,
        desc: str = "training",
        disable: bool | None = None,
    ) -> None:
        self.loss, self.validator, self.desc, self.disable = loss, validator, desc, disable
        self.bar: tqdm | None = None
        self.validation_bar: tqdm | None = None
        self.redirect = contextlib.ExitStack()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        # not on EXCEPTION_RAISED: a handler there would keep ignite from raising the error
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._close)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._start_validation)
            self.validator.add_event_handler(Events.ITERATION_COMPLETED, self._step_validation)
            self.validator.add_event_handler(Events.COMPLETED, self._close_validation)

    def _start(self, engine: Engine) -> None:
        # added after the handlers listed before it (e.g. a checkpoint loader), so a resumed run's position is known
        total = engine.state.max_epochs * engine.state.epoch_length
        self.bar = tqdm(total=total, initial=engine.state.iteration, desc=self.desc, disable=self.disable,
                        dynamic_ncols=True, unit="it")  # fmt: skip
        if not self.bar.disable:
            self.redirect.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))

    def _step(self, engine: Engine) -> None:
        postfix = {"epoch": f"{engine.state.epoch}/{engine.state.max_epochs}"}
        if self.loss is not None:
            loss = self.loss(engine.state.output)
            loss = loss[0] if isinstance(loss, (tuple, list)) else loss  # MONAI's from_engine on a dict output
            postfix["loss"] = f"{float(loss):.4f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def _close(self, engine: Engine) -> None:
        self._close_validation(engine)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.redirect.close()

    def _start_validation(self, validator: Engine) -> None:
        if self.bar is not None and not self.bar.disable:
            self.validation_bar = tqdm(total=validator.state.epoch_length, desc="validation", leave=False,
                                       dynamic_ncols=True, unit="case")  # fmt: skip

    def _step_validation(self, validator: Engine) -> None:
        if self.validation_bar is not None:
            self.validation_bar.update(1)

    def _close_validation(self, validator: Engine) -> None:
        if self.validation_bar is not None:
            self.validation_bar.close()
            self.validation_bar = None
