"""Settings: flags over env over defaults; every bad value is one line naming the setting, exit 2."""

import subprocess
import sys

import pytest

from sidecar.cli import _loop_factory, main
from sidecar.config import ExitCode, SettingsError, build_settings, format_duration, parse_duration


def test_defaults():
    s = build_settings()
    assert s.upstream == "http://127.0.0.1:8000"
    assert s.windows == [60.0, 300.0, 900.0]
    assert (s.break_even, s.near_break_even_upper, s.verdict_window) == (0.5, 0.65, 300.0)
    assert s.log_format == "json"


def test_env_applies_and_flag_wins(monkeypatch):
    monkeypatch.setenv("SPECDEC_SCRAPE_INTERVAL", "10s")
    monkeypatch.setenv("SPECDEC_WINDOWS", "1m, 30m")
    monkeypatch.setenv("SPECDEC_VERDICT_WINDOW", "30m")
    monkeypatch.setenv("SPECDEC_MIN_DRAFTS", "7")
    s = build_settings(min_drafts="9")
    assert s.scrape_interval == 10.0
    assert s.windows == [60.0, 1800.0]
    assert s.min_drafts == 9


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"scrape_interval": "soon"}, "--scrape-interval / SPECDEC_SCRAPE_INTERVAL"),
        ({"break_even": "0.7"}, "must be above break_even"),
        ({"windows": "1m,15m"}, "verdict_window (5m) is not one of windows (1m,15m)"),
        ({"windows": ""}, "--windows"),
        ({"metrics_port": "-1"}, "--metrics-port"),
        ({"upstream": "vllm:8000"}, "--upstream"),
        ({"scrape_timeout": "10s"}, "scrape_timeout (10s) exceeds scrape_interval (5s)"),
        ({"windows": "5s,5m"}, "shorter than two scrape intervals"),
        ({"log_level": "loud"}, "--log-level"),
        ({"speculative": "maybe"}, "invalid setting --speculative / SPECDEC_SPECULATIVE (got 'maybe')"),
    ],
)
def test_bad_values_name_the_setting(flags, fragment):
    with pytest.raises(SettingsError) as info:
        build_settings(**flags)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_cli_exits_2_with_one_line(capsys):
    assert main(["serve", "--near-break-even-upper", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("specdec-sidecar: invalid setting --near-break-even-upper")


def test_speculative_setting(monkeypatch, capsys):
    assert build_settings().speculative == "auto"
    assert build_settings(speculative="False").speculative == "false"
    monkeypatch.setenv("SPECDEC_SPECULATIVE", "true")
    assert build_settings().speculative == "true"
    monkeypatch.setenv("SPECDEC_SPECULATIVE", "off")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--speculative / SPECDEC_SPECULATIVE (got 'off')" in err[0], err


def test_python_dash_m_entry_point_reports_bad_env():
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"],
        env={"SPECDEC_MIN_DRAFTS": "none", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "SPECDEC_MIN_DRAFTS" in proc.stderr


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("5", 5.0), ("5s", 5.0), ("1m", 60.0), ("2h", 7200.0)])
def test_durations_round_trip(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


def test_scrape_timeout_defaults_to_the_interval_when_shorter():
    assert build_settings(scrape_interval="1s").scrape_timeout == 1.0  # used to exit 2: 3s > 1s
    assert build_settings(scrape_interval="10s").scrape_timeout == 3.0
    assert build_settings(scrape_interval="10s", scrape_timeout="8s").scrape_timeout == 8.0


def test_api_key_from_file_and_bad_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-abc\n")
    assert build_settings(upstream_api_key_file=str(key)).api_key == "sk-abc"
    assert build_settings(upstream_api_key="sk-x").api_key == "sk-x"
    with pytest.raises(SettingsError, match="--upstream-api-key-file / SPECDEC_UPSTREAM_API_KEY_FILE"):
        build_settings(upstream_api_key_file=str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="both set"):
        build_settings(upstream_api_key="a", upstream_api_key_file=str(key))


def test_secrets_are_not_echoed_in_errors():
    with pytest.raises(SettingsError) as error:
        build_settings(upstream="ftp://user:hunter2@host")
    assert "hunter2" not in str(error.value) and "***@host" in str(error.value)
    assert "sk-secret" not in repr(build_settings(upstream_api_key="sk-secret"))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["top", "--interval", "0"], "invalid setting --interval (got '0'): Input should be greater than 0"),
        (["top", "--window", "nan"], "invalid setting --window"),
        (["top", "--url", "localhost:9464"], "invalid setting --url (got 'localhost:9464'): not an http(s) URL"),
        (["measure"], "invalid setting --url: required, not given"),
        (["measure", "--url", "http://x", "--rounds", "9", "--requests", "3"],
         "invalid settings: --rounds (9) is more than --requests (3)"),
        (["plan", "--target", "nowhere", "--draft", "nowhere"], "invalid setting --target (got 'nowhere'): no such file"),
        (["serve", "--metrics-port"], "argument --metrics-port: expected one argument"),
        (["serve", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_every_command_rejects_a_bad_setting_the_same_way(argv, fragment, capsys):
    """Whether argparse or a command's settings model finds it: exit 2 and one line naming the flag."""
    assert main(argv) == ExitCode.BAD_SETTING == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specdec-sidecar: ") and fragment in err[0], err
    assert captured.out == ""


def test_help_and_version_exit_0(capsys):
    assert main(["measure", "--help"]) == ExitCode.OK
    assert "--fail-if-hurts-at TEMPERATURES" in capsys.readouterr().out
    assert main(["--version"]) == ExitCode.OK


def test_each_exit_status_has_one_name():
    assert len(ExitCode.__members__) == len(set(ExitCode))  # no aliases: one name per meaning
    assert (ExitCode.OK, ExitCode.GATE_FAILED, ExitCode.BAD_SETTING, ExitCode.UNMEASURABLE) == (0, 1, 2, 3)


def test_event_loop_choice_is_checked_with_the_settings():
    assert _loop_factory("asyncio") is None
    assert build_settings(event_loop="asyncio").event_loop == "asyncio"
    with pytest.raises(SettingsError, match="--event-loop / SPECDEC_EVENT_LOOP"):
        build_settings(event_loop="trio")
