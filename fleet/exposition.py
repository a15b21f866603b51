"""GET /metrics: the registry in Prometheus text exposition, for a scraper to graph and alert on.

Metrics (all read from the registry at scrape time, none kept in memory):
    edgeops_devices_enrolled                                   devices enrolled
    edgeops_devices_online                                     devices whose last report said online
    edgeops_devices{state}                                     devices by the state of their latest execution
                                                               ("none" before their first report)
    edgeops_rollout_stage{rollout,model,version}               index of the rollout's current stage
    edgeops_rollout_devices{rollout,model,version,state}       the rollout's executions per state
    edgeops_rollout_state{rollout,model,version,state}         1 for the rollout's state, 0 for the others
    edgeops_telemetry_records_total                            telemetry records stored, ever
    edgeops_telemetry_dropped_total                            records devices dropped from a full outbox
    edgeops_drift_flagged{model,version}                       1 when fleet/drift.py recommends retraining,
                                                               0 while the version only drifts

Invariants: each render uses a private CollectorRegistry, so nothing leaks into prometheus_client's
global one and two renders never share state; the two telemetry counters only grow (stored records are
never deleted, and a device's drop count is its highest report), so rate() over them is an ingest rate;
every state series is present (0 when empty), so a series never vanishes when its count drops to 0;
device counts, rollouts and drift flags are what `edgeops status` shows (registry.device_counts,
rollout.summaries, drift.flagged), read once per scrape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import sqlite_utils
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgeops.fleet import drift, registry, rollout
from edgeops.fleet.rollout import ROLLOUT_STATES
from edgeops.protocol.wire import STATES

_ROLLOUT_LABELS = ["rollout", "model", "version"]


class FleetCollector:
    """A prometheus_client collector reading one registry database on every collect()."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        counts = registry.device_counts(self.db)
        yield GaugeMetricFamily("edgeops_devices_enrolled", "Devices enrolled.", value=counts["total"])
        yield GaugeMetricFamily("edgeops_devices_online", "Devices whose last report said they are online.",
                                value=counts["online"])
        states = Counter(counts["states"])
        by_state = GaugeMetricFamily("edgeops_devices", "Devices by the state of their latest execution.",
                                     labels=["state"])
        for state in ("none", *STATES):
            by_state.add_metric([state], states[state])
        yield by_state
        yield from self._rollouts(rollout.summaries(self.db))
        received, dropped = self.db.execute(
            "select coalesce(sum(received), 0), coalesce(sum(dropped), 0) from telemetry_devices").fetchone()
        yield CounterMetricFamily("edgeops_telemetry_records", "Telemetry records stored.", value=received)
        yield CounterMetricFamily("edgeops_telemetry_dropped", "Telemetry records devices dropped from a full outbox.",
                                  value=dropped)
        flagged = GaugeMetricFamily("edgeops_drift_flagged", "1 when the model version's drift calls for retraining.",
                                    labels=["model", "version"])
        for version in drift.flagged(self.db):
            flagged.add_metric([version["model"], version["version"]], 1)
        yield flagged

    @staticmethod
    def _rollouts(rollouts: list[dict]) -> Iterator[Metric]:
        stage = GaugeMetricFamily("edgeops_rollout_stage", "Index of the rollout's current stage.",
                                  labels=_ROLLOUT_LABELS)
        devices = GaugeMetricFamily("edgeops_rollout_devices", "The rollout's device executions by state.",
                                    labels=[*_ROLLOUT_LABELS, "state"])
        state = GaugeMetricFamily("edgeops_rollout_state", "1 for the state the rollout is in, 0 for the others.",
                                  labels=[*_ROLLOUT_LABELS, "state"])
        for each in rollouts:
            labels = [str(each["id"]), each["model"], each["version"]]
            stage.add_metric(labels, each["stage"])
            counts = each.get("counts", {})
            for name in STATES:
                devices.add_metric([*labels, name], counts.get(name, 0))
            for name in ROLLOUT_STATES:
                state.add_metric([*labels, name], int(each["state"] == name))
        yield from (stage, devices, state)


def render(db: sqlite_utils.Database) -> tuple[bytes, str]:
    """The exposition body and its content type, for GET /metrics."""
    scrape = CollectorRegistry()
    scrape.register(FleetCollector(db))
    return generate_latest(scrape), CONTENT_TYPE_LATEST
