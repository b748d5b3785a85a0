"""Which Prefect server a command talks to, and what Prefect prints on its terminal.

`prefect_session()` connects a command that runs flows: to the server PREFECT_API_URL names
(environment or Prefect profile), else to thermocal's local server (flows.daemon), started on
first need and reused, or, with THERMOCAL_SERVER=ephemeral, to Prefect's temporary server for the
process. Nothing here imports Prefect before it is needed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

from tasks.errors import InvalidInput, StoreError, ThermocalError, TrainingDiverged

# Prefect reads these when it is imported. A cold ephemeral server takes about 17 s to become
# healthy, close to Prefect's 20 s default timeout; there is no internet for telemetry here.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


class _SaidOnce(logging.Filter):
    """thermocal says a user's mistake itself, once and last, and a finished run's warnings in its
    summary. On the terminal, Prefect's lines about them (the task's and the flow's failure, each
    repeating the message; the validate stage's warnings) are dropped; Prefect's API handler is
    left alone, so the run's record in the UI keeps every detail."""

    NAMES = tuple(cls.__name__ for cls in (InvalidInput, TrainingDiverged, StoreError))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ThermocalError):
            return False
        if record.levelno == logging.WARNING and getattr(record, "task_run_name", None) == "validate":
            return False
        return not any(name in record.getMessage() for name in self.NAMES)


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(name) for name in [None, *logging.root.manager.loggerDict] if name is None or name.startswith("prefect")]
    return [h for logger in loggers for h in getattr(logger, "handlers", []) if isinstance(h, PrefectConsoleHandler)]


def quiet_user_errors() -> None:
    for handler in _console_handlers():
        handler.setLevel(logging.NOTSET)  # heard again, should an earlier command in this process have silenced it
        if not any(isinstance(f, _SaidOnce) for f in handler.filters):
            handler.addFilter(_SaidOnce())


def silence_prefect_console() -> None:
    """Nothing of Prefect's after thermocal's error line (its temporary server says goodbye at exit)."""
    if "prefect" in sys.modules:
        for handler in _console_handlers():
            handler.setLevel(logging.CRITICAL + 1)


def _toml(path: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect would find it: the environment, Prefect's settings when Prefect
    is loaded already (a test harness), else the sources Prefect reads, without importing it: a
    `.env` file, `prefect.toml` or `pyproject.toml` ([tool.prefect]) in the working directory,
    and the active profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value()
    try:
        dotenv = Path(".env").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        dotenv = []
    for line in dotenv:
        name, _, value = line.partition("=")
        if name.strip().removeprefix("export ").strip() == "PREFECT_API_URL" and value.strip().strip("'\""):
            return value.strip().strip("'\"")
    for table in (_toml(Path("prefect.toml")), _toml(Path("pyproject.toml")).get("tool", {}).get("prefect", {})):
        if url := table.get("api", {}).get("url"):
            return url
    from flows.daemon import home

    profiles = _toml(Path(os.environ.get("PREFECT_PROFILES_PATH", home() / "profiles.toml")).expanduser())
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def warm_port() -> int | None:
    """The port of the local server whose warm process may run this command (flows.warm): None
    with THERMOCAL_WARM=0, THERMOCAL_SERVER=ephemeral, a PREFECT_API_URL, or no server running."""
    from flows import warm

    mode = os.environ.get("THERMOCAL_SERVER", "local").strip().lower() or "local"
    if not warm.enabled() or mode != "local" or _configured_api_url():
        return None
    from flows import daemon

    servers = daemon.running_servers()
    return servers[0][0] if servers else None


def _warm_imports() -> None:
    """While a new local server starts (10-30 s), import what this run will need: Prefect, and the
    libraries a computed stage uses (torch, pandas, pandera, matplotlib), on the other core."""
    import matplotlib
    import pandera.pandas  # noqa: F401
    import torch  # noqa: F401

    import flows.calibrate  # noqa: F401

    matplotlib.use("Agg")


@functools.cache
def verified_tls(cafile: str):
    import ssl

    return ssl.create_default_context(cafile=cafile)  # as Prefect's clients build it


def _with_shared_tls(init):
    @functools.wraps(init)
    def __init__(self, api, *args, httpx_settings=None, **kwargs):
        from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

        if "verify" not in (httpx_settings or {}) and not PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
            import certifi

            httpx_settings = {**(httpx_settings or {}), "verify": verified_tls(PREFECT_API_SSL_CERT_FILE.value() or certifi.where())}
        init(self, api, *args, httpx_settings=httpx_settings, **kwargs)

    __init__.shares_tls = True
    return __init__


def share_tls_context() -> None:
    """One verified TLS context for every Prefect API client of this process, per certificate file.

    Each PrefectClient and SyncPrefectClient builds its own (ssl.create_default_context, loading
    every CA certificate: 25-30 ms of CPU here), and a run makes four (the flow's, the result
    store's, the log and event workers'), though a local server speaks plain HTTP. An SSLContext
    is meant to be shared between clients (httpx says so); each gets the one Prefect would build.
    The warm process installs this before it forks (its forks inherit the built context: flows.*
    is imported afresh in a fork, the wrapper stays on Prefect's classes with its cache)."""
    from prefect.client import orchestration

    for cls in (orchestration.PrefectClient, orchestration.SyncPrefectClient):
        if not getattr(cls.__init__, "shares_tls", False):
            cls.__init__ = _with_shared_tls(cls.__init__)


@contextlib.contextmanager
def prefect_session(serving: bool = False):
    """Prefect's settings for this machine, quiet user errors, and the server this command talks
    to: the one PREFECT_API_URL names (environment or Prefect profile); else thermocal's local
    server (flows.daemon), started on first need and reused; or, with THERMOCAL_SERVER=ephemeral,
    Prefect's temporary server for this process (none for `serve`, which checks for a server)."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mode = os.environ.get("THERMOCAL_SERVER", "local").strip().lower() or "local"
    if mode not in ("local", "ephemeral"):
        raise InvalidInput(f"THERMOCAL_SERVER must be local or ephemeral (got {os.environ['THERMOCAL_SERVER']!r})")
    port = None
    if mode == "local" and not _configured_api_url():
        from flows import daemon

        port = daemon.ensure(warm=_warm_imports)
        os.environ["PREFECT_API_URL"] = daemon.api_url(port)  # read by Prefect when it loads, and by processes this run starts
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.calibrate  # noqa: F401  (imports Prefect, whose logging set-up _quiet_user_errors adjusts)

    quiet_user_errors()
    share_tls_context()
    if port is not None:
        from flows import daemon

        with temporary_settings({PREFECT_API_URL: daemon.api_url(port)}), daemon.lease(port):  # should Prefect have loaded before
            yield
    elif mode == "ephemeral" and not PREFECT_API_URL.value() and not serving:
        from flows.serving import start_ephemeral_server

        start_ephemeral_server()
        yield
    else:
        yield
