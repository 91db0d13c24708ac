"""The data path's tallies, as Prometheus reads them (the served metrics are tested in test_admin.py)."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardproxy.counters import DURATION_BUCKETS, Tally
from shardproxy.ops.metrics import _EventCollector


def _samples(tallies: dict) -> dict:
    registry = CollectorRegistry()
    registry.register(_EventCollector(tallies))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    tally = Tally()
    for value in (DURATION_BUCKETS[0], DURATION_BUCKETS[0] * 1.5, DURATION_BUCKETS[-1], DURATION_BUCKETS[-1] * 2):
        tally.duration.observe(value)
    samples = _samples({("s1", "primary"): tally})

    def bucket(le: str) -> float:
        return samples["shardproxy_query_duration_seconds_bucket", (("le", le), ("role", "primary"), ("shard", "s1"))]

    assert bucket("0.0001") == 1  # a value equal to a bound counts in that bucket ("le")
    assert bucket("0.00025") == 2
    assert bucket("10.0") == 3
    assert bucket("+Inf") == 4
    labels = (("role", "primary"), ("shard", "s1"))
    assert samples["shardproxy_query_duration_seconds_count", labels] == 4
    assert abs(samples["shardproxy_query_duration_seconds_sum", labels] - (0.0001 + 0.00015 + 10 + 20)) < 1e-9


def test_queries_by_kind_per_shard_and_role() -> None:
    primary, replica = Tally(write=5), Tally(read=7)
    samples = _samples({("s1", "primary"): primary, ("s1", "replica"): replica})
    assert samples["shardproxy_queries_total", (("kind", "write"), ("role", "primary"), ("shard", "s1"))] == 5
    assert samples["shardproxy_queries_total", (("kind", "read"), ("role", "replica"), ("shard", "s1"))] == 7
    assert samples["shardproxy_queries_total", (("kind", "ddl"), ("role", "replica"), ("shard", "s1"))] == 0
