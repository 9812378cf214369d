"""The Grafana dashboard and the alert rules ask only for series that the server exports.

Every PromQL expression in deploy/grafana/streaminfer-dashboard.json and
deploy/prometheus/alerts.yml is split into its selectors. Each metric name must
be a sample name of streaminfer.server.metrics, each label matcher a label of
that metric, and each grouping label a label of a metric in the expression.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from conftest import REPO_ROOT
from streaminfer.server import metrics

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "streaminfer-dashboard.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"

# Labels that Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# PromQL words that are neither metric names nor followed by a parenthesis of arguments.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
# Aggregation operators: the grouping clause may stand between the name and its argument.
AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}
)
# Keywords followed by a parenthesised list of label names.
GROUPINGS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{?\w+\}?)
  | (?P<number>\d[\w.]*)
  | (?P<identifier>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punctuation>=~|!~|!=|==|>=|<=|[-+*/%^(){}\[\],=<>@])
    """,
    re.VERBOSE,
)


@dataclasses.dataclass
class Selector:
    """One vector selector of an expression: a metric name and the labels its matchers name."""

    metric: str
    matchers: dict[str, str]


@dataclasses.dataclass
class ParsedExpression:
    selectors: list[Selector]
    grouping_labels: set[str]


def tokenize(expression: str) -> list[tuple[str, str]]:
    """Split a PromQL expression into (kind, text) tokens. Raise ValueError on a character PromQL does not use."""
    tokens = []
    position = 0
    while position < len(expression):
        match = TOKEN.match(expression, position)
        if match is None:
            raise ValueError(f"cannot tokenize {expression[position:position + 20]!r} in {expression!r}")
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def parse(expression: str) -> ParsedExpression:
    """Collect the selectors and grouping labels of ``expression``. Raise ValueError on a selector without a name."""
    tokens = tokenize(expression)
    parsed = ParsedExpression([], set())
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if text == "[":
            # A range or subquery duration: nothing in it names a series.
            index = tokens.index(("punctuation", "]"), index) + 1
        elif text == "{":
            raise ValueError(f"selector without a metric name in {expression!r}")
        elif kind == "identifier" and text in GROUPINGS:
            # on() and group_left() may be empty, and group_left may also stand without a list.
            if following != "(":
                index += 1
                continue
            end = tokens.index(("punctuation", ")"), index)
            parsed.grouping_labels.update(token for kind, token in tokens[index + 2 : end] if kind == "identifier")
            index = end + 1
        elif kind == "identifier" and (text in KEYWORDS or text in AGGREGATIONS or following == "("):
            index += 1
        elif kind == "identifier":
            selector = Selector(text, {})
            index += 1
            if index < len(tokens) and tokens[index][1] == "{":
                end = tokens.index(("punctuation", "}"), index)
                inside = tokens[index + 1 : end]
                for position, (token_kind, token) in enumerate(inside):
                    if token_kind == "identifier" and position + 1 < len(inside) and inside[position + 1][1] in (
                        "=",
                        "!=",
                        "=~",
                        "!~",
                    ):
                        selector.matchers[token] = inside[position + 2][1]
                index = end + 1
            parsed.selectors.append(selector)
        else:
            index += 1
    return parsed


def exported_labels() -> dict[str, frozenset[str]]:
    """Map every sample name the server exports to the labels it can carry once scraped."""
    labels: dict[str, frozenset[str]] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, metrics.BatchedHistogram):
            collector = collector.histogram
        if not isinstance(collector, (Counter, Gauge, Histogram)):
            continue
        # prometheus_client keeps a metric's label names in _labelnames.
        names = frozenset(collector._labelnames) | TARGET_LABELS
        for family in collector.describe():
            if family.type == "histogram":
                labels[f"{family.name}_bucket"] = names | {"le"}
                labels[f"{family.name}_sum"] = names
                labels[f"{family.name}_count"] = names
            elif family.type == "counter":
                labels[f"{family.name}_total"] = names
            else:
                labels[family.name] = names
    return labels


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    return dashboard()["panels"]


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    """Yield (panel title, expr) for every query target of the dashboard."""
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def rule_expressions() -> Iterator[tuple[str, str]]:
    for rule in alert_rules():
        yield rule["alert"], rule["expr"]


def all_expressions() -> list[tuple[str, str]]:
    return list(dashboard_expressions()) + list(rule_expressions())


def problems_of(expression: str, labels: dict[str, frozenset[str]]) -> list[str]:
    """Return what in ``expression`` the server does not export: unknown metrics, matchers or grouping labels."""
    parsed = parse(expression)
    found = []
    if not parsed.selectors:
        found.append("no metric selector")
    for selector in parsed.selectors:
        if selector.metric not in labels:
            found.append(f"metric {selector.metric} is not exported")
            continue
        for label in selector.matchers:
            if label not in labels[selector.metric]:
                found.append(f"{selector.metric} has no label {label}")
    available = set().union(*(labels.get(selector.metric, frozenset()) for selector in parsed.selectors))
    for label in parsed.grouping_labels - available:
        found.append(f"grouping label {label} is on no metric of the expression")
    return found


# -- the checker itself --------------------------------------------------------


def test_parser_finds_selectors_and_groupings() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (job, model, le) (rate(streaminfer_chunk_latency_seconds_bucket'
        '{model=~"$model", instance=~"a|b"}[$__rate_interval]))) > 0.25 and on (job, model) '
        "sum by (job, model) (rate(streaminfer_chunk_latency_seconds_count[5m])) > 1"
    )
    parsed = parse(expression)
    assert [selector.metric for selector in parsed.selectors] == [
        "streaminfer_chunk_latency_seconds_bucket",
        "streaminfer_chunk_latency_seconds_count",
    ]
    assert parsed.selectors[0].matchers == {"model": '"$model"', "instance": '"a|b"'}
    assert parsed.grouping_labels == {"job", "model", "le"}


def test_checker_reports_unknown_series_and_labels() -> None:
    labels = exported_labels()
    assert problems_of("rate(streaminfer_chunks_received_total[5m])", labels) == []
    assert problems_of("rate(streaminfer_no_such_metric_total[5m])", labels) == [
        "metric streaminfer_no_such_metric_total is not exported"
    ]
    # A metric exported without its sample suffix is not a series either.
    assert problems_of("rate(streaminfer_chunks_received[5m])", labels) == [
        "metric streaminfer_chunks_received is not exported"
    ]
    assert problems_of('streaminfer_streams_active{model=~"$model"}', labels) == [
        "streaminfer_streams_active has no label model"
    ]
    assert problems_of("sum by (modality) (rate(streaminfer_streams_ended_total[5m]))", labels) == [
        "grouping label modality is on no metric of the expression"
    ]
    assert problems_of("vector(1)", labels) == ["no metric selector"]


def test_exported_labels_match_exported_names() -> None:
    assert set(exported_labels()) == set(metrics.exported_names())


# -- dashboard and rules -----------------------------------------------------


@pytest.mark.parametrize(("where", "expression"), all_expressions())
def test_expression_uses_exported_series(where: str, expression: str) -> None:
    assert problems_of(expression, exported_labels()) == [], where


def test_expressions_cover_the_questions() -> None:
    """The dashboard and the rules read every metric that the latency, load, error and resource questions need."""
    used = {selector.metric for _, expression in all_expressions() for selector in parse(expression).selectors}
    expected = {
        "streaminfer_chunk_latency_seconds_bucket",
        "streaminfer_chunks_received_total",
        "streaminfer_results_total",
        "streaminfer_chunks_dropped_total",
        "streaminfer_streams_rejected_total",
        "streaminfer_streams_ended_total",
        "streaminfer_queue_depth",
        "streaminfer_queue_oldest_age_seconds",
        "streaminfer_queue_wait_seconds_bucket",
        "streaminfer_batch_size_bucket",
        "streaminfer_batch_fill_ratio_sum",
        "streaminfer_batches_total",
        "streaminfer_inference_seconds_bucket",
        "streaminfer_decode_wait_seconds_bucket",
        "streaminfer_decode_seconds_bucket",
        "streaminfer_postprocess_seconds_bucket",
        "streaminfer_write_seconds_bucket",
        "streaminfer_event_loop_lag_seconds_bucket",
        "streaminfer_chunks_in_flight",
        "streaminfer_streams_paused",
        "streaminfer_process_cpu_seconds_total",
        "streaminfer_process_resident_memory_bytes",
        "streaminfer_gpu_memory_used_bytes",
        "streaminfer_gpu_utilization_ratio",
        "streaminfer_model_healthy",
    }
    assert expected - used == set()


def test_panels_have_titles_and_unique_ids() -> None:
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel.get("title", "").strip(), f"panel {panel['id']} has no title"
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles))


def test_panels_query_the_datasource_variable() -> None:
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                assert (row, column) not in cells, f"{panel['title']} overlaps {cells.get((row, column))}"
                cells[(row, column)] = panel["title"]


def test_template_variables() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    labels = exported_labels()
    for name in ("instance", "model"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, query
        assert match.group(2) == name
        assert problems_of(match.group(1), labels) == [], query
        assert name in labels[parse(match.group(1)).selectors[0].metric]


def test_model_and_instance_variables_filter_every_query() -> None:
    """Each selector of a metric with a model label filters by $model, and every selector by $instance."""
    labels = exported_labels()
    model_filtered = 0
    for title, expression in dashboard_expressions():
        for selector in parse(expression).selectors:
            assert selector.matchers.get("instance") == '"$instance"', f"{title}: {selector.metric}"
            if "model" in labels[selector.metric]:
                assert selector.matchers.get("model") == '"$model"', f"{title}: {selector.metric}"
                model_filtered += 1
    assert model_filtered >= 10


def test_rules_carry_severity_annotations_and_tuning_notes() -> None:
    rules = alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 100, rule["alert"]
    # Every rule's block in the file has a comment that names what to tune.
    blocks = re.split(r"\n(?=      - alert: )", ALERTS.read_text())[1:]
    assert len(blocks) == len(rules)
    for block in blocks:
        assert re.search(r"#.*\b[Tt]une\b", block), block.splitlines()[0]


def test_rules_name_existing_panels() -> None:
    """Each dashboard panel or row that an alert's description points to exists under that title."""
    titles = {panel["title"] for panel in dashboard_panels()}
    named = 0
    for rule in alert_rules():
        description = " ".join(rule["annotations"]["description"].split())
        for title in re.findall(r"\b[Tt]he ([A-Z][\w ,()-]*?) (?:panel|row)\b", description):
            assert title in titles, f"{rule['alert']} names a missing panel or row: {title}"
            named += 1
    assert named >= 5
