"""What a search shows on the terminal while Tune runs: the live trial table (fits 100
columns) and Ctrl-C (Tune's graceful stop, then this search's own resume command)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from raysparse.search.settings import SearchSettings
from raysparse.search.space import SearchSpace

logger = logging.getLogger(__name__)


# The live trial table: Tune's default lists every parameter and four inferred metrics (134
# columns here). Ours: name, status, location, iteration, milestone, validation perplexity,
# then the searched parameters that still fit in TABLE_WIDTH (the final report lists all).
TABLE_WIDTH = 100

PARAM_WIDTH = 10  # longer strings are cut by Tune

HEADER_WIDTH = 8  # a parameter's column header: its name, cut

# (header, widest value): trial name, status, location ("pid=12345", or "IP:pid" for a trial
# on another node: up to 15 characters counted), then the metrics.
_FIXED_COLUMNS = [("Trial name", len("search_trainable_1234abcd")), ("status", len("TERMINATED")), ("loc", 15)]

_METRIC_COLUMNS = {"training_iteration": ("it", 3), "sparsity_pct": ("sp%", 3), "val_ppl": ("val_ppl", 8)}


def _column_width(header: str, widest: int) -> int:
    """Characters one column takes in Tune's psql table: the header gets 2 of padding, then
    '| ' before the cell and ' ' after it."""
    return max(len(header) + 2, widest) + 3


def _param_width(spec) -> int:
    if spec.kind == "choice":
        return min(PARAM_WIDTH, max(len(str(choice)) for choice in spec.choices))
    if spec.kind == "int":
        return len(str(int(spec.high)))
    # A float as Tune prints it: 6 significant digits, so 0.0123457 (9) for a low end of 0.01,
    # 1.23457e-05 (11) below 1e-4.
    low = abs(float(spec.low))
    return 8 if low >= 0.1 else 9 if low >= 0.01 else 10 if low >= 0.001 else 11


def trial_table(space: SearchSpace, settings: SearchSettings):
    """A CLIReporter whose table fits TABLE_WIDTH columns (Tune's legacy reporter: the new
    output engine takes no column settings)."""
    from ray import tune

    width = 1 + sum(_column_width(head, widest) for head, widest in _FIXED_COLUMNS + list(_METRIC_COLUMNS.values()))
    columns = {name: _column_width(name[:HEADER_WIDTH], _param_width(spec)) for name, spec in space.params.items()}
    params: dict[str, str] = {}
    for name, column in columns.items():
        if width + column <= TABLE_WIDTH:
            params[name] = name[:HEADER_WIDTH]
            width += column
    metrics = {key: head for key, (head, _) in _METRIC_COLUMNS.items()}
    if not params:  # Tune reads no parameter columns as "all of them": show the narrowest
        narrowest = min(columns, key=columns.get)
        params = {narrowest: narrowest[:HEADER_WIDTH]}
    return tune.CLIReporter(metric_columns=metrics, parameter_columns=params,
                            max_column_length=PARAM_WIDTH, max_report_frequency=30,
                            total_samples=settings.num_samples)


@contextlib.contextmanager
def legacy_table():
    """Tune ignores a progress_reporter unless its legacy output engine is on (RAY_AIR_NEW_OUTPUT=0)."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


@contextlib.contextmanager
def stop_gracefully_on_ctrl_c():
    """Ctrl-C during `Tuner.fit`: Tune's graceful stop (the experiment state saved once more),
    and an Event that says it happened, so the search exits 130 with its own resume command.

    Tune's SIGINT handler swallows the interrupt (fit returns as if done) and prints a
    `Tuner.restore(...)` hint; its SIGUSR1 handler does the same graceful stop. So Tune's
    SIGINT handler is turned off and ours sets the Event, then raises SIGUSR1 for Tune. A
    second Ctrl-C gets the previous handler (KeyboardInterrupt: stop at once).
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT)
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def on_interrupt(signum, frame) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
        logger.warning("Ctrl-C: stopping the search after saving its state (press Ctrl-C again to stop at once)")
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, on_interrupt)
    resume_hint = _DropTuneRestoreHint()
    logging.getLogger("ray.tune.tune").addFilter(resume_hint)
    try:
        yield interrupted
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(resume_hint)
        signal.signal(signal.SIGINT, previous)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


class _DropTuneRestoreHint(logging.Filter):
    """Tune's 'Resume experiment with: Tuner.restore(...)' is not how this search resumes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def tune_statuses(grid) -> list[str] | None:
    """Each trial's status in the experiment state Tune saved at the interrupt, in the grid's
    order. Tune saves a trial it cut as PENDING (to run again on restore); one that ended, by
    finishing or by ASHA, as TERMINATED; the in-memory trials no longer say which."""
    from ray.tune import ExperimentAnalysis

    try:
        order = [trial.trial_id for trial in grid._experiment_analysis.trials]
        saved = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    except (AttributeError, OSError, ValueError) as exc:  # pragma: no cover - another Ray version
        logger.warning("cannot read the trials' saved statuses (%s): interrupted trials read 'stopped'", exc)
        return None
    status = {trial.trial_id: str(trial.status) for trial in saved.trials}
    return [status.get(trial_id, "") for trial_id in order]
