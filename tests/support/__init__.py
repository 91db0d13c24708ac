"""What the tests share: helpers only, no tests. Test modules import from here, never from each other."""

from shardproxy.devtools.sandbox import Cluster, Sandbox

APP_DB = "appdb"  # owned by the `app` user, so tests can create tables in it (made by conftest's `pg` fixture)


def app_clusters(sandbox: Sandbox, prefix: str, count: int) -> list[Cluster]:
    """`count` primary-only clusters named prefix0, prefix1, ..., each with APP_DB owned by `app`: one a shard."""
    clusters = [sandbox.cluster(f"{prefix}{i}") for i in range(count)]
    for cluster in clusters:
        cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    return clusters
