"""Settings: `TrialConfig` (one trial) and the `setting(...)` declaration every settings class uses.

A package so the declaration machinery (declare) and the trial settings (trial) stay short
modules of one layer; everything is re-exported here, so `from raysparse.config import X` is
the one import path.
"""
from __future__ import annotations

from raysparse.config.declare import Bounds, Setting, check_settings, from_mapping, setting, settings_of
from raysparse.config.trial import (
    DEFAULT_MAX_WINDOW,
    DTYPES,
    MAGNITUDE_SCOPES,
    METHODS,
    RATIOS,
    RECOVERIES,
    RECOVERY,
    SCHEDULE,
    SCHEDULES,
    STRUCTURED,
    PruneConfig,
    TrialConfig,
)

__all__ = [
    "DEFAULT_MAX_WINDOW", "DTYPES", "MAGNITUDE_SCOPES", "METHODS", "RATIOS", "RECOVERIES", "RECOVERY", "SCHEDULE",
    "SCHEDULES", "STRUCTURED", "Bounds", "PruneConfig", "Setting", "TrialConfig", "check_settings", "from_mapping",
    "setting", "settings_of",
]
