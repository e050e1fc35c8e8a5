"""``specdec-sidecar`` command line: subcommands, flags mapped onto Settings, clean exits on bad input."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import structlog
from aiohttp import web

from sidecar import __version__
from sidecar.config import DURATION_FIELDS, Settings, SettingsError, build_settings, format_duration
from sidecar.logs import configure_logging

EXIT_BAD_SETTINGS = 2


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; defaults stay None so env vars and defaults apply when not given."""
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        if name == "scrape_timeout":
            shown = "min(3s, interval)"
        elif name in DURATION_FIELDS:
            shown = ",".join(format_duration(v) for v in default) if isinstance(default, list) else format_duration(default)
        elif isinstance(default, list | tuple):
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) or "unset"
        else:
            shown = "unset" if default is None else default
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{info.description} [env SPECDEC_{name.upper()}, default {shown}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdec-sidecar",
        description="Is vLLM speculative decoding helping? Scrapes vLLM, derives acceptance, re-exports it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the sidecar next to a vLLM server")
    _add_settings_flags(serve)
    top = sub.add_parser("top", help="live terminal view of a sidecar's /metrics")
    top.add_argument("--url", default="http://127.0.0.1:9464/metrics", help="the sidecar's /metrics URL")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--window", type=float, default=60.0,
                     help="seconds of history the distributions cover (default 60)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--alertmanager", help="also show firing SpecDecode alerts from this Alertmanager URL")
    from sidecar.commands.measure import add_arguments as add_measure_arguments

    add_measure_arguments(sub.add_parser(
        "measure", help="paired benchmark: speculative vs baseline server per temperature and concurrency"))
    from sidecar.commands.plan import add_parser as add_plan_parser

    add_plan_parser(sub)
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    fields = {name: getattr(args, name, None) for name in Settings.model_fields}
    return build_settings(**fields)


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
    about 15% more events per CPU-second on uvloop and spends less CPU per request, for a few MB more RSS."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "auto":
            return None
        raise ImportError("uvloop is not installed (pip install uvloop)") from None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            settings = _settings_from(args)
        except SettingsError as error:
            print(f"specdec-sidecar: {error}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        configure_logging(settings.log_format, settings.log_level)
        try:
            with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
                runner.run(_serve(settings))
        except KeyboardInterrupt:
            pass
        except ImportError as error:
            print(f"specdec-sidecar: invalid setting --event-loop / SPECDEC_EVENT_LOOP: {error}", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        return 0
    if args.command == "top":
        from sidecar.commands.top import run_top

        if args.interval <= 0 or args.window <= 0:
            print("specdec-sidecar: --interval and --window must be positive", file=sys.stderr)
            return EXIT_BAD_SETTINGS
        return run_top(args.url, args.interval, args.window, args.once, alertmanager=args.alertmanager)
    if args.command == "measure":
        from sidecar.commands.measure import run_measure

        return run_measure(args)
    if args.command == "plan":
        from sidecar.commands.plan import run_plan

        return run_plan(args)
    parser.error(f"unknown command {args.command}")
    return EXIT_BAD_SETTINGS
