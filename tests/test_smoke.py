import psycopg

from tests.support import APP_DB


def test_query_through_proxy(proxy):
    with psycopg.connect(proxy.dsn(dbname=APP_DB), autocommit=True) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
