"""``specdec-sidecar`` command line: one sub-command per module, each the same way.

A command is a settings model (its fields are the flags, ``config.add_flags``) and a ``run(settings)`` that
returns an ``ExitCode``. ``main`` parses, builds the model (``config.settings_from``) and runs it; a bad
setting, whether argparse or the model finds it, is one line on stderr naming the flag, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web
from pydantic import BaseModel

from sidecar import __version__
from sidecar.config import (
    DURATION_FIELDS,
    ExitCode,
    Settings,
    SettingsError,
    add_flags,
    format_duration,
    settings_from,
)
from sidecar.logs import configure_logging

SERVE_ENV_PREFIX = "SPECDEC_"


@dataclass(frozen=True)
class Command:
    help: str
    settings: type[BaseModel]
    run: Callable[[BaseModel], int]
    env_prefix: str | None = None  # serve alone reads SPECDEC_* env vars: it runs in a pod
    description: str | None = None


class OneLineParser(argparse.ArgumentParser):
    """argparse's own rejections (an unknown flag, a flag without its value) as one line, exit 2, like every
    other bad setting, instead of the usage block."""

    def error(self, message: str):  # type: ignore[override]
        print(f"specdec-sidecar: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_SETTING)


def _serve_defaults_shown() -> dict[str, str]:
    shown = {"scrape_timeout": "min(3s, interval)"}
    for name in DURATION_FIELDS:
        default = Settings.model_fields[name].get_default(call_default_factory=True)
        if name != "scrape_timeout":
            shown[name] = (",".join(format_duration(v) for v in default) if isinstance(default, list)
                           else format_duration(default))
    return shown


async def _serve(settings: Settings) -> None:
    from sidecar.app import create_app

    log = structlog.get_logger("sidecar")
    app = create_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.metrics_host, settings.metrics_port)
    await site.start()
    log.info(
        "sidecar_started",
        version=__version__,
        upstream=settings.upstream_for_logs,
        metrics=[f"{addr[0]}:{addr[1]}" for addr in runner.addresses],
        scrape_interval=settings.scrape_interval,
        windows=settings.windows,
    )
    try:
        await stop.wait()
    finally:
        log.info("sidecar_stopping")
        await runner.cleanup()


def _loop_factory(choice: str):
    """uvloop's loop for ``uvloop``, and for ``auto`` when it is installed (a dependency on Linux); None =
    asyncio's own. Measured side by side in bench/bench_proxy.py (docs/benchmarks.md): the proxy relays
    about 15% more events per CPU-second on uvloop and spends less CPU per request, for a few MB more RSS.
    Settings has already refused ``uvloop`` when it is not installed."""
    if choice == "asyncio" or (choice == "auto" and importlib.util.find_spec("uvloop") is None):
        return None
    import uvloop

    return uvloop.new_event_loop


def run_serve(settings: Settings) -> ExitCode:
    configure_logging(settings.log_format, settings.log_level)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(_serve(settings))
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


def commands() -> dict[str, Command]:
    from sidecar.commands import inject, measure, plan, top

    return {
        "serve": Command("run the sidecar next to a vLLM server", Settings, run_serve, SERVE_ENV_PREFIX),  # type: ignore[arg-type]
        "top": Command("live terminal view of a sidecar's /metrics", top.TopSettings, top.run),  # type: ignore[arg-type]
        "measure": Command("paired benchmark: speculative vs baseline server per temperature and concurrency",
                           measure.MeasureSettings, measure.run),  # type: ignore[arg-type]
        "plan": Command(
            "what a draft model costs in GPU memory and KV-cache tokens", plan.PlanSettings, plan.run,  # type: ignore[arg-type]
            description="Size a target + draft pair for vLLM V1: weights, KV bytes per token, KV tokens with and "
                        "without the draft (the draft's layers share the one KV pool), max concurrency."),
        "inject": Command(
            "add the sidecar to the vLLM pods in Kubernetes manifests (also a Helm post-renderer)",
            inject.InjectSettings, inject.run,  # type: ignore[arg-type]
            description=inject.DESCRIPTION),
    }


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    table = table or commands()
    parser = OneLineParser(
        prog="specdec-sidecar",
        description="Is vLLM speculative decoding helping? Scrapes vLLM, derives acceptance, re-exports it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in table.items():
        add_flags(sub.add_parser(name, help=command.help, description=command.description), command.settings,
                  command.env_prefix, _serve_defaults_shown() if command.settings is Settings else None)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    """serve's Settings from parsed flags (the Helm chart's tests check its args through this)."""
    return settings_from(args, Settings, SERVE_ENV_PREFIX)


def main(argv: Sequence[str] | None = None) -> int:
    table = commands()
    try:
        args = build_parser(table).parse_args(argv)
    except SystemExit as exited:  # --help, --version, or a bad flag already reported in one line
        return int(exited.code or 0)
    command = table[args.command]
    try:
        settings = settings_from(args, command.settings, command.env_prefix)
    except SettingsError as error:
        print(f"specdec-sidecar: {error}", file=sys.stderr)
        return ExitCode.BAD_SETTING
    return int(command.run(settings))
