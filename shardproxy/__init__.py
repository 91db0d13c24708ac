"""shardproxy: a PostgreSQL proxy that pools, shards by key and routes by region."""

__version__ = "0.1.0"
