"""Which environment variables the genembed processes read: shared by the compose and Helm tests, because a
misspelt GENEMBED_* name is ignored silently (the settings classes take extra='ignore')."""

from __future__ import annotations

import warnings

from pydantic_settings import BaseSettings

from harness.procs import REPO
from model_server.settings import WorkerSettings
from service.settings import GatewaySettings

SETTINGS: dict[str, tuple[type[BaseSettings], str]] = {
    "gateway": (GatewaySettings, "GENEMBED_"),
    "worker": (WorkerSettings, "GENEMBED_WORKER_"),
}
# Variables read outside the settings classes, and the file that reads each (None: a library's own).
OTHER_READERS = {"GENEMBED_CACHE_DIR": "model_server/loading.py", "HF_HOME": None}
# Gateway variables of settings still to come (issue 6: the refine-query judge); warned about until they exist.
PENDING_GATEWAY_SETTINGS = {"GENEMBED_JUDGE_URL", "GENEMBED_JUDGE_MODEL", "GENEMBED_JUDGE_API_KEY"}


def settings_field(process: str, key: str) -> str | None:
    """The field of `process`'s settings that variable `key` sets; None for a variable read elsewhere or
    still to come. Fails for a variable nothing reads."""
    if key in OTHER_READERS:
        reader = OTHER_READERS[key]
        assert reader is None or key in (REPO / reader).read_text(), f"{reader} no longer reads {key}"
        return None
    settings_class, prefix = SETTINGS[process]
    field = key.removeprefix(prefix).lower()
    if key.startswith(prefix) and field in settings_class.model_fields:
        return field
    assert process == "gateway" and key in PENDING_GATEWAY_SETTINGS, f"{process}: {key} is no setting"
    warnings.warn(f"{key} is not a gateway setting yet", stacklevel=2)
    return None
