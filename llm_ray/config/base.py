"""The base of every config section, and the error users see."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(Exception):
    """A configuration problem, described for the user (no traceback needed)."""


class Section(BaseModel):
    # allow_inf_nan=False: an infinite or NaN number is never a usable setting (train.lr=.inf).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
