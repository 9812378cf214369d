"""promtool accepts the alert rules and the example config, and the rules' unit tests pass and can fail."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run `make monitoring-tools`, which installs Debian's prometheus package")
    return path


def run_promtool(promtool: str, *arguments: str | pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *map(str, arguments)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def test_check_rules(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in output


def test_check_config(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", CONFIG)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS: 1 rule files found" in output
    assert f"SUCCESS: {len(alert_names())} rules found" in output


def test_config_scrapes_only_loopback() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert targets == ["127.0.0.1:9464"]
    assert all(set(job) <= {"job_name", "metrics_path", "static_configs"} for job in config["scrape_configs"])


def test_unit_tests_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", ALERTS_TEST)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output
    assert "FAILED" not in output


def test_unit_tests_cover_every_alert() -> None:
    """Each alert has an evaluation that expects it firing and one that expects it quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = set(alert_names())
    assert names - firing == set()
    assert names - quiet == set()
    assert firing | quiet == names


def mutate(tmp_path: pathlib.Path, alert: str, expression: str) -> pathlib.Path:
    """Copy the rules and their tests into ``tmp_path``, replacing ``alert``'s expression; return the test file."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                rule["expr"] = expression
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    return pathlib.Path(shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml"))


@pytest.mark.parametrize("alert", alert_names())
def test_unit_tests_catch_silent_alert(promtool: str, tmp_path: pathlib.Path, alert: str) -> None:
    result = run_promtool(promtool, "test", "rules", mutate(tmp_path, alert, "vector(0) > 1"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"alertname: {alert}" in output


@pytest.mark.parametrize("alert", alert_names())
def test_unit_tests_catch_always_firing_alert(promtool: str, tmp_path: pathlib.Path, alert: str) -> None:
    result = run_promtool(promtool, "test", "rules", mutate(tmp_path, alert, "vector(1)"))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"alertname: {alert}" in output
