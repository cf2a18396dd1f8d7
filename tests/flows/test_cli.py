"""The `vecaf` command line refuses bad input with one line and exit code 2, before any server is contacted.

No stack runs here: every case must fail before the CLI reads settings or talks to Prefect, so a traceback or
a connection attempt would show in the output or the exit code.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from infra.cli import app


@pytest.fixture
def cli(monkeypatch, tmp_path):
    # A closed port: a command that reached for the stack would fail with a connection error, not exit 2.
    monkeypatch.setenv("VECAF_STACK__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("VECAF_STACK__PREFECT_PORT", "9")
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, list(args))
        return result.exit_code, result.output, result.exception

    return invoke


def _one_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("cron", ["bad", "61 * * * *", "* * *", "0 3 * * mon-xyz"])
def test_an_invalid_cron_is_one_line_and_exit_2(cli, cron):
    code, out, exc = cli("deploy", "--cron", cron)
    assert code == 2, (out, exc)
    assert _one_line(out).startswith(f"invalid --cron {cron!r}: Invalid cron string")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.yaml", "data: [1, 2\n", "is not valid YAML at line 2, column 1"),
        ("tab.yaml", "data:\n\tpool_size: 10\n", "is not valid YAML at line 2"),
        ("bad.json", '{"data": ', "is not valid JSON: Expecting value"),
        ("list.yaml", "- 1\n- 2\n", "must hold a mapping of parameter groups (data, training...), not a list"),
        ("unknown.yaml", "data:\n  bogus: 1\n", "invalid parameters: data.bogus: Extra inputs are not permitted"),
        ("top.yaml", "bogus: 1\n", "invalid parameters: bogus: Extra inputs are not permitted"),
        ("long.yaml", "ood_prompt: " + "x" * 10_000 + "\n", "ood_prompt: String should have at most 300 characters"),
        ("range.yaml", "training:\n  ratio: 0.9\n", "invalid parameters: training.ratio: Input should be less than"),
    ],
)
@pytest.mark.parametrize("command", ["run", "deploy"])
def test_a_malformed_params_file_is_one_line_and_exit_2(cli, tmp_path, command, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    code, out, exc = cli(command, "--params", str(path))
    assert code == 2, (out, exc)
    assert message in _one_line(out)
    assert str(path) in out or "invalid parameters" in out


def test_a_missing_params_file_is_one_line_and_exit_2(cli, tmp_path):
    code, out, _ = cli("run", "--params", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "cannot read parameters file" in _one_line(out) and "nope.yaml" in out


def test_an_out_of_range_promotion_margin_is_one_line_and_exit_2(cli):
    code, out, _ = cli("promote", "--margin", "3")
    assert code == 2
    assert _one_line(out) == "invalid parameters: promotion_margin: Input should be less than or equal to 1"


@pytest.mark.parametrize("days", ["0", "31", "-2"])
def test_simulate_refuses_days_out_of_range_in_one_line_with_exit_2(cli, days):
    code, out, exc = cli("simulate", "--days", days, "--quick")
    assert code == 2, (out, exc)
    assert _one_line(out) == f"error: --days must be an integer in 1..30, got {int(days)}"


def test_simulate_refuses_days_that_are_not_a_number(cli):
    code, out, exc = cli("simulate", "--days", "three")
    assert code == 2, (out, exc)
    assert "Invalid value for '--days'" in out and "Traceback" not in out
