"""Helpers shared by the benchmark reports (report.py, scenarios_report.py,
translate_report.py): read a results file, group records by round, take a
figure per round and report its median with the rounds' spread."""

import json
import statistics


def load(path):
    """The records of a JSON-lines results file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_round(records, field, value):
    """{round: {target: record}} for the records whose `field` is `value`."""
    out = {}
    for r in records:
        if r.get(field) == value:
            out.setdefault(r["round"], {})[r["target"]] = r
    return out


def series(rounds, fn):
    """fn(round_dict) for every round where it can be computed."""
    values = []
    for _, targets in sorted(rounds.items()):
        try:
            v = fn(targets)
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        if v is not None:
            values.append(v)
    return values


def med(values):
    return statistics.median(values) if values else None


def fmt(values, spec, unit=""):
    """'median (min–max)' or just the value when there is one round."""
    if not values:
        return "n/a"
    m = med(values)
    if len(values) == 1:
        return f"{m:{spec}}{unit}"
    return f"{m:{spec}}{unit} ({min(values):{spec}}–{max(values):{spec}})"
