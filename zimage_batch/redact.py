"""What of a job may be shown or stored: the job as a dict, with secrets' values replaced."""

from __future__ import annotations

from typing import Any


def redact_env_vars(settings: dict[str, Any], mark: str = "<set>") -> dict[str, Any]:
    """`settings` (a job as a dict) with the values of runtime_env.env_vars replaced by `mark`:
    only the names are shown or stored, the values may be credentials."""
    env_vars = (settings.get("runtime_env") or {}).get("env_vars")
    if not env_vars:
        return settings
    return {**settings, "runtime_env": {**settings["runtime_env"], "env_vars": {k: mark for k in env_vars}}}
