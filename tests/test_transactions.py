"""Transactions that span shards, through real drivers in the modes apps use by default, against two real shards:
commits on every shard or none (two-phase when two shards wrote), savepoints, errors, deferred constraints,
distributed deadlocks, a proxy killed mid-commit, and a differential run against one unsharded server.

Every outcome is read on direct connections to the shards, and no test may leave a prepared transaction behind.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import orm

from shardproxy.datapath.transaction import TAG_KEY
from shardproxy.devtools.sandbox import LOOPBACK, wait_until
from tests.support import APP_DB, app_clusters
from tests.support.ring import owner

SHARDS = 2
BALANCE = 1000


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(sandbox):
    return app_clusters(sandbox, "txn", SHARDS)


@pytest.fixture(scope="module")
def names(shards):
    return [c.name for c in shards]


def start_proxy(sandbox, shards, name: str, **sections):
    pool = {"size": 10, "query_wait_timeout": "20s", **sections.pop("pool", {})}
    return sandbox.proxy(name, shards, pool=pool, metrics={"host": LOOPBACK, "port": sandbox.free_port()},
                         **sections)


@pytest.fixture(scope="module")
def proxy(sandbox, shards):
    """Transaction pooling, the default. The tables are made through it (DDL on every shard)."""
    proxy = start_proxy(sandbox, shards, "txn")
    with connect(proxy, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (user_id bigint NOT NULL, v int, note text)")
        conn.execute("CREATE TABLE accounts (user_id bigint PRIMARY KEY, balance int NOT NULL)")
        conn.execute("CREATE TABLE pledges (user_id bigint NOT NULL, code int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        conn.execute("CREATE TABLE ledger (user_id bigint NOT NULL, n int NOT NULL, amount int, "
                     "PRIMARY KEY (user_id, n))")
    return proxy


@pytest.fixture(scope="module")
def session_proxy(sandbox, shards, proxy):
    return start_proxy(sandbox, shards, "txn-session", pool={"mode": "session"})


@pytest.fixture(params=["transaction", "session"])
def any_proxy(request, proxy, session_proxy):
    return proxy if request.param == "transaction" else session_proxy


@pytest.fixture(scope="module")
def reference(sandbox):
    """One unsharded server, for the differential test."""
    cluster = sandbox.cluster("txnref")
    cluster.primary.sql(f"CREATE DATABASE {APP_DB} OWNER app")
    cluster.primary.sql("CREATE TABLE ledger (user_id bigint NOT NULL, n int NOT NULL, amount int, "
                        "PRIMARY KEY (user_id, n)); GRANT ALL ON ledger TO app", dbname=APP_DB)
    return cluster


@pytest.fixture(autouse=True)
def nothing_left_prepared(request):
    """After every test: no two-phase commit was left half done."""
    yield
    if "shards" in request.fixturenames:
        shards = request.getfixturevalue("shards")
        assert [c.primary.sql("SELECT gid FROM pg_prepared_xacts") for c in shards] == [[]] * SHARDS


# -- helpers ---------------------------------------------------------------------------------------------------
def connect(proxy, **kwargs) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(dbname=APP_DB), connect_timeout=10, **kwargs)


def direct(cluster, query: str) -> list[tuple]:
    return cluster.primary.sql(query, dbname=APP_DB)


def on_shards(shards, query: str) -> list[list[tuple]]:
    return [direct(cluster, query) for cluster in shards]


def keys_on(names, shard: int, start: int, count: int = 1) -> list[int]:
    """`count` user ids from `start` on that the ring puts on shards[shard]."""
    found, key = [], start
    while len(found) < count:
        if owner(key, names) == names[shard]:
            found.append(key)
        key += 1
    return found


def apart(names, start: int) -> tuple[int, int]:
    """A user on the first shard and one on the second."""
    return keys_on(names, 0, start)[0], keys_on(names, 1, start)[0]


def notes(shards, note: str) -> list[list[int]]:
    """Per shard, the users of the items with this note."""
    found = on_shards(shards, f"SELECT user_id FROM items WHERE note = '{note}'")
    return [sorted(key for (key,) in rows) for rows in found]


def scrape(proxy) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{proxy.config['metrics']['port']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def open_accounts(proxy, users: list[int]) -> None:
    with connect(proxy, autocommit=True) as conn:
        for user in users:
            conn.execute("INSERT INTO accounts (user_id, balance) VALUES (%s, %s)", (user, BALANCE))


def balances(shards, users: list[int]) -> int:
    listed = ", ".join(map(str, users))
    return sum(total or 0 for [(total,)] in on_shards(shards, f"SELECT sum(balance) FROM accounts "
                                                              f"WHERE user_id IN ({listed})"))


# -- drivers in their default modes ------------------------------------------------------------------------------
def test_psycopg_default_mode_well_past_the_prepare_threshold(any_proxy, shards, names):
    """psycopg's default: every statement in a transaction, prepared server-side from the sixth run on."""
    note = f"default-{any_proxy.name}"
    keys = keys_on(names, 0, 100, 10) + keys_on(names, 1, 100, 10)
    with connect(any_proxy) as conn:
        for key in keys:  # one shard per transaction
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, %s)", (key, note))
            conn.commit()
        for key in keys:  # one transaction on both shards
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 2, %s)", (key, note))
            assert conn.execute("SELECT count(*) FROM items WHERE user_id = %s AND note = %s",
                                (key, note)).fetchone() == (2,)
        conn.commit()
        for key in keys:
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 3, %s)", (key, note))
        conn.rollback()
    for shard, rows in enumerate(on_shards(shards, f"SELECT user_id, v FROM items WHERE note = '{note}'")):
        assert sorted(rows) == sorted((key, v) for key in keys[shard * 10:shard * 10 + 10] for v in (1, 2))


def test_psycopg_transaction_blocks_and_savepoints(any_proxy, shards, names):
    """Nested transaction() blocks are savepoints: a shard that joins after one rolls back to it too."""
    note = f"blocks-{any_proxy.name}"
    a, b = apart(names, 200)
    with connect(any_proxy, autocommit=True) as conn:
        insert = "INSERT INTO items (user_id, v, note) VALUES (%s, %s, %s)"
        with conn.transaction():
            conn.execute(insert, (a, 1, note))
            with conn.transaction():  # SAVEPOINT, then shard b joins
                conn.execute(insert, (b, 2, note))
                conn.execute(insert, (a, 2, note))
                raise psycopg.Rollback()
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():  # an error on one shard
                conn.execute(insert, (b, 3, note))
                conn.execute("INSERT INTO accounts (user_id, balance) VALUES (%s, 1), (%s, 1)", (b, b))
            conn.execute(insert, (b, 4, note))  # the transaction goes on, on both shards
        with pytest.raises(ZeroDivisionError), conn.transaction():
            conn.execute(insert, (a, 5, note))
            conn.execute(insert, (b, 5, note))
            raise ZeroDivisionError
    assert on_shards(shards, f"SELECT user_id, v FROM items WHERE note = '{note}' ORDER BY v") == [[(a, 1)], [(b, 4)]]
    assert on_shards(shards, f"SELECT count(*) FROM accounts WHERE user_id = {b}") == [[(0,)], [(0,)]]


def test_psycopg_pipeline_in_a_transaction(proxy, shards, names):
    a, b = apart(names, 250)
    with connect(proxy) as conn:
        with conn.pipeline():
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'pipelined')", (a,))
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'pipelined')", (b,))
            conn.execute("UPDATE items SET v = 2 WHERE user_id = %s AND note = 'pipelined'", (a,))
        conn.commit()
    assert on_shards(shards, "SELECT user_id, v FROM items WHERE note = 'pipelined'") == [[(a, 2)], [(b, 1)]]


async def test_asyncpg_transactions_and_executemany(proxy, shards, names):
    keys = keys_on(names, 0, 300, 3) + keys_on(names, 1, 300, 3)
    conn = await asyncpg.connect(proxy.dsn(dbname=APP_DB))
    try:
        async with conn.transaction():
            for key in keys:
                await conn.execute("INSERT INTO items (user_id, v, note) VALUES ($1, 1, 'asyncpg-tx')", key)
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("INSERT INTO items (user_id, v, note) VALUES ($1, 1, 'asyncpg-undone')", keys[0])
                await conn.execute("INSERT INTO accounts (user_id, balance) VALUES ($1, 1), ($1, 1)", keys[-1])
        # executemany runs its rows in one implicit transaction: across shards, all or nothing
        await conn.executemany("INSERT INTO items (user_id, v, note) VALUES ($1, $2, 'asyncpg-many')",
                               [(key, i) for i, key in enumerate(keys)])
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany("INSERT INTO accounts (user_id, balance) VALUES ($1, 0)",
                                   [(keys[0],), (keys[-1],), (keys[-1],)])
    finally:
        await conn.close()
    assert notes(shards, "asyncpg-tx") == [keys[:3], keys[3:]]
    assert notes(shards, "asyncpg-undone") == [[], []]
    assert notes(shards, "asyncpg-many") == [keys[:3], keys[3:]]
    listed = ", ".join(map(str, keys))
    assert on_shards(shards, f"SELECT count(*) FROM accounts WHERE user_id IN ({listed})") == [[(0,)], [(0,)]]


def test_sqlalchemy_orm_session_spanning_shards(proxy, shards, names):
    class Base(orm.DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        user_id: orm.Mapped[int] = orm.mapped_column(sa.BigInteger, primary_key=True)
        balance: orm.Mapped[int]

    a, b = apart(names, 400)
    engine = sa.create_engine(proxy.dsn(dbname=APP_DB).replace("postgresql://", "postgresql+psycopg://"))
    try:
        with orm.Session(engine) as session:  # rows for several users, committed once
            session.add_all([Account(user_id=a, balance=10), Account(user_id=b, balance=20)])
            session.commit()
        with orm.Session(engine) as session:  # reads two users on two shards, changes both
            first, second = session.get(Account, a), session.get(Account, b)
            first.balance, second.balance = first.balance - 5, second.balance + 5
            session.commit()
        with orm.Session(engine) as session:
            session.get(Account, a).balance = 0
            session.get(Account, b).balance = 0
            session.flush()
            session.rollback()
    finally:
        engine.dispose()
    assert on_shards(shards, f"SELECT user_id, balance FROM accounts WHERE user_id IN ({a}, {b})") == [
        [(a, 5)], [(b, 25)]]


def test_scatter_reads_and_ddl_inside_a_transaction_see_its_writes(proxy, shards, names):
    a, b = apart(names, 500)
    with connect(proxy) as conn:
        conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'own'), (%s, 1, 'own')", (a, a))
        conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'own')", (b,))
        assert conn.execute("SELECT count(*) FROM items WHERE note = 'own'").fetchone() == (3,)  # every shard
        conn.execute("CREATE TABLE made_here (user_id bigint, note text)")
        conn.execute("INSERT INTO made_here (user_id, note) VALUES (%s, 'x')", (a,))
        conn.execute("INSERT INTO made_here (user_id, note) VALUES (%s, 'y')", (b,))
        assert conn.execute("SELECT note FROM made_here ORDER BY note").fetchall() == [("x",), ("y",)]
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM items WHERE note = 'own'").fetchone() == (0,)
        conn.rollback()
    assert on_shards(shards, "SELECT to_regclass('made_here')") == [[(None,)], [(None,)]]


# -- errors, and what they leave ---------------------------------------------------------------------------------
def test_an_error_on_one_shard_aborts_the_whole_transaction(proxy, shards, names):
    a, b = apart(names, 600)
    with connect(proxy) as conn:
        conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'aborted')", (a,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO accounts (user_id, balance) VALUES (%s, 1), (%s, 1)", (b, b))
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 2, 'aborted')", (a,))
        conn.commit()  # ends in a rollback, as on one server
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.commit()
    assert notes(shards, "aborted") == [[], []]


def test_a_deferred_constraint_that_fails_at_prepare_rolls_back_every_shard(proxy, shards, names):
    """Both shards wrote: the commit prepares on each, one refuses, and the client gets that shard's error."""
    a, b = apart(names, 700)
    with connect(proxy, autocommit=True) as conn:
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 77)", (b,))
    with connect(proxy) as conn:
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 1)", (a,))
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 77)", (b,))  # checked at commit only
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.commit()
    assert on_shards(shards, "SELECT user_id, code FROM pledges ORDER BY code") == [[], [(b, 77)]]


def test_a_deferred_constraint_that_fails_at_the_first_shards_commit_rolls_back_every_shard(proxy, shards, names):
    """Both shards wrote; the second prepares, then the first shard's COMMIT (the decision) fails its deferred
    constraint: the second rolls its prepared transaction back, and the client gets the first shard's error."""
    a, b = apart(names, 720)
    with connect(proxy, autocommit=True) as conn:
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 78)", (a,))
    with connect(proxy) as conn:
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 78)", (a,))  # checked at commit only
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 2)", (b,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.commit()
    assert on_shards(shards, "SELECT user_id, code FROM pledges WHERE code IN (2, 78)") == [[(a, 78)], []]


def test_a_pipeline_back_to_a_shard_it_read_on_commits_its_write_there_in_two_phases(proxy, shards, names):
    """A pipeline in a transaction reads on one shard, writes on the other, then comes back to write on the first,
    whose answer to whether it wrote (asked as the client left it) may still be on its way: that answer no longer
    holds. Both shards wrote, so a deferred constraint that fails on the first rolls back the second too."""
    a, b = apart(names, 740)
    with connect(proxy, autocommit=True) as conn:
        conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 79)", (a,))
    with connect(proxy) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute("SELECT * FROM pledges WHERE user_id = %s", (a,))
            conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 3)", (b,))
            conn.execute("INSERT INTO pledges (user_id, code) VALUES (%s, 79)", (a,))  # checked at commit only
            conn.commit()
    assert on_shards(shards, "SELECT user_id, code FROM pledges WHERE code IN (3, 79)") == [[(a, 79)], []]


def test_refuse_mode_keeps_a_transaction_on_one_shard(sandbox, shards, names, proxy):
    refusing = start_proxy(sandbox, shards, "txn-refuse", routing={"cross_shard_transactions": "refuse"})
    a, b = apart(names, 800)
    try:
        for prepare_threshold in (None, 0):  # unnamed statements, then named server-side ones
            with connect(refusing, prepare_threshold=prepare_threshold) as conn:
                conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'half')", (a,))
                with pytest.raises(psycopg.errors.FeatureNotSupported, match="^shardproxy:"):
                    conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'half')", (b,))
                with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                    conn.execute("SELECT 1")
                conn.commit()
                for key in (a, b):  # one shard per transaction is fine, past the prepare threshold too
                    for _ in range(6):
                        conn.execute("SELECT count(*) FROM items WHERE user_id = %s", (key,))
                        conn.commit()
    finally:
        refusing.stop()
    assert notes(shards, "half") == [[], []]


def test_servers_without_prepared_transactions_are_named_at_startup_and_by_check(sandbox, shards):
    """Two-phase commit needs max_prepared_transactions > 0: the startup log and `shardproxy check --connect`
    name the primary that lacks it (and only that one)."""
    plain = sandbox.cluster("txn-no2pc", settings={"max_prepared_transactions": "0"})
    proxy = sandbox.proxy("txn-no2pc", [plain, shards[0]])
    try:
        lacking, fine = f"{LOOPBACK}:{plain.primary.port}", f"{LOOPBACK}:{shards[0].primary.port}"
        assert wait_until(lambda: f"{lacking}: max_prepared_transactions is 0" in proxy.log(), 10), proxy.log()
        done = subprocess.run([sys.executable, "-m", "shardproxy", "check", "-c", proxy.config_path, "--connect"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        warnings = [line for line in done.stderr.splitlines() if "max_prepared_transactions is 0" in line]
        assert len(warnings) == 1 and lacking in warnings[0], done.stderr
        assert f"{fine}: max_prepared_transactions" not in proxy.log()
    finally:
        proxy.stop()
        plain.primary.stop()


# -- what it costs, in metrics -------------------------------------------------------------------------------------
def test_metrics_count_transactions_by_the_shards_they_touched(proxy, names):
    a, b = apart(names, 900)
    before = scrape(proxy)
    with connect(proxy) as conn:
        conn.execute("SELECT * FROM items WHERE user_id = %s", (a,))  # one shard
        conn.commit()
        conn.execute("SELECT * FROM items WHERE user_id = %s", (a,))  # two shards, reads only
        conn.execute("SELECT * FROM items WHERE user_id = %s", (b,))
        conn.commit()
        conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'counted')", (a,))  # one writer: plain
        conn.execute("SELECT * FROM items WHERE user_id = %s", (b,))
        conn.commit()
        conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'counted')", (a,))  # two writers
        conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'counted')", (b,))
        conn.commit()
    after = scrape(proxy)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("shardproxy_transactions_total", shards="multi") == 2
    assert grew("shardproxy_transactions_total", shards="two_phase") == 1
    assert grew("shardproxy_transactions_total", shards="single") >= 1
    assert grew("shardproxy_two_phase_commit_seconds_count") == 1


def test_a_notify_from_a_shard_that_only_read_arrives_after_a_commit_across_shards(proxy, shards, names):
    """One shard wrote; the shard used last only read and sent a NOTIFY, which PostgreSQL cannot prepare: the
    commit learns that this leg wrote nothing before it prepares anything, commits it plainly, and the listener
    gets the notification."""
    a, b = apart(names, 960)
    with psycopg.connect(shards[1].primary.dsn("app", "secret", APP_DB), autocommit=True) as listener:
        listener.execute("LISTEN shardproxy_test")
        with connect(proxy) as conn:
            conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'notified')", (a,))
            conn.execute("SELECT * FROM items WHERE user_id = %s", (b,))
            conn.execute("NOTIFY shardproxy_test, 'from the second shard'")
            conn.commit()
        heard = [notify.payload for notify in listener.notifies(timeout=5, stop_after=1)]
    assert heard == ["from the second shard"]
    assert notes(shards, "notified") == [[a], []]


def test_a_write_statement_that_wrote_nothing_commits_with_the_shard_that_did(proxy, shards, names):
    """The shard used last ran an UPDATE that matched no row: it is prepared with the commit's first round (it
    ran a write), found to have written nothing, and finishes with the other shard's plain COMMIT; the commit
    counts as one on several shards, not a two-phase one."""
    a, b = apart(names, 980)
    before = scrape(proxy)
    with connect(proxy) as conn:
        conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'wrote alone')", (a,))
        assert conn.execute("UPDATE items SET v = 1 WHERE user_id = %s AND note = 'none such'", (b,)).rowcount == 0
        conn.commit()
    after = scrape(proxy)
    assert notes(shards, "wrote alone") == [[a], []]

    def grew(kind: str) -> float:
        key = ("shardproxy_transactions_total", (("shards", kind),))
        return after.get(key, 0) - before.get(key, 0)

    assert (grew("multi"), grew("two_phase")) == (1, 0)


# -- distributed deadlocks ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_proxy(sandbox, shards, proxy):
    """A second proxy over the same shards, as another worker or another proxy of a fleet."""
    return start_proxy(sandbox, shards, "txn-other")


@pytest.mark.parametrize("apart_processes", [False, True], ids=["one proxy", "two proxies"])
def test_a_wait_cycle_across_shards_ends_in_40P01_for_one_transaction(request, proxy, shards, names,
                                                                       apart_processes):
    """Also when the two transactions run in different proxy processes, neither of which sees the other's: the
    servers tell which backends are one transaction (each leg's tag)."""
    a, b = apart(names, 1000 + 20 * apart_processes)
    open_accounts(proxy, [a, b])
    other = request.getfixturevalue("other_proxy") if apart_processes else proxy
    first, second = connect(proxy), connect(other)
    outcomes: dict[str, object] = {}

    def run(name: str, conn: psycopg.Connection, mine: int, theirs: int, barrier: threading.Barrier) -> None:
        try:
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE user_id = %s", (mine,))
            barrier.wait()
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE user_id = %s", (theirs,))
            conn.commit()
            outcomes[name] = "committed"
        except psycopg.errors.DeadlockDetected as exc:
            conn.rollback()
            outcomes[name] = exc
        finally:
            outcomes[f"{name}-at"] = time.monotonic()

    try:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=run, args=("first", first, a, b, barrier)),
                   threading.Thread(target=run, args=("second", second, b, a, barrier))]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads), "a transaction of the cycle hangs"
    finally:
        first.close()
        second.close()
    results = [outcomes["first"], outcomes["second"]]
    assert sorted(map(type, results), key=str) == sorted([str, psycopg.errors.DeadlockDetected], key=str), results
    victim = next(r for r in results if isinstance(r, psycopg.errors.DeadlockDetected))
    assert victim.diag.message_detail.startswith("shardproxy:")
    assert max(outcomes["first-at"], outcomes["second-at"]) - started < 3  # deadlock_timeout is 1s
    assert balances(shards, [a, b]) == 2 * BALANCE
    assert "distributed deadlock between clients" in proxy.log() + other.log()


def transfers(proxy, users: list[int], clients: int, seconds: float) -> dict[str, float]:
    """Clients moving money between random accounts in random lock order until the time is up (or the proxy is
    gone); what happened, counted."""
    counts = {"committed": 0, "deadlocks": 0, "distributed": 0, "longest": 0.0, "lost": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            conn = connect(proxy)
        except psycopg.OperationalError:
            with lock:
                counts["lost"] += 1
            return
        with conn:
            while time.monotonic() < deadline:
                source, target = rng.sample(users, 2)
                amount = rng.randint(1, 50)
                steps = [(source, -amount), (target, amount)]
                rng.shuffle(steps)  # both lock orders
                began = time.monotonic()
                try:
                    for user, delta in steps:
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE user_id = %s", (delta, user))
                    conn.commit()
                    outcome = "committed"
                except psycopg.errors.DeadlockDetected as exc:
                    conn.rollback()
                    distributed = (exc.diag.message_detail or "").startswith("shardproxy:")
                    outcome = "distributed" if distributed else "deadlocks"
                except psycopg.OperationalError:  # the proxy is gone
                    with lock:
                        counts["lost"] += 1
                    return
                with lock:
                    counts[outcome] += 1
                    counts["longest"] = max(counts["longest"], time.monotonic() - began)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    assert not any(thread.is_alive() for thread in threads), "a transfer hangs"
    return counts


def test_a_pipeline_across_shards_holds_its_tag_on_the_leg_that_waits(proxy, shards, names):
    """A pipeline in autocommit (one implicit transaction) writes on one shard, then waits for a row lock on the
    other: the waiting leg holds the transaction's tag, so that deadlock detection sees it there."""
    a, b = apart(names, 990)
    with connect(proxy, autocommit=True) as conn:
        conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'piped')", (b,))
    with psycopg.connect(shards[1].primary.dsn("app", "secret", APP_DB)) as blocker:
        blocker.execute("SELECT * FROM items WHERE user_id = %s FOR UPDATE", (b,))

        def piped() -> None:
            with connect(proxy, autocommit=True) as conn, conn.pipeline():
                conn.execute("INSERT INTO items (user_id, note) VALUES (%s, 'piped')", (a,))
                conn.execute("UPDATE items SET v = 9 WHERE user_id = %s AND note = 'piped'", (b,))

        thread = threading.Thread(target=piped)
        thread.start()
        waiting = "FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE items%'"
        assert wait_until(lambda: direct(shards[1], f"SELECT count(*) {waiting}") == [(1,)], 10)
        tagged = direct(shards[1], f"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                   f"classid = {TAG_KEY} AND objsubid = 2 AND pid IN (SELECT pid {waiting})")
        blocker.rollback()
        thread.join(timeout=10)
    assert tagged == [(1,)]
    assert notes(shards, "piped") == [[a], [b]]


def test_bank_transfers_between_shards_keep_the_total(proxy, shards, names):
    """8 clients, 15 seconds, accounts on both shards, both lock orders: the money is all there at the end,
    and every deadlock (within a shard, or across shards) ended in 40P01 for one transfer, none in a hang."""
    users = keys_on(names, 0, 2000, 4) + keys_on(names, 1, 2000, 4)
    open_accounts(proxy, users)
    counts = transfers(proxy, users, clients=8, seconds=15)
    assert counts["committed"] > 100 and counts["lost"] == 0, counts
    assert counts["distributed"] > 0, counts
    assert counts["longest"] < 10, counts
    assert balances(shards, users) == len(users) * BALANCE


SLOW_PREPARE = """
CREATE FUNCTION slow_prepare() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_prepare AFTER UPDATE ON accounts DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.user_id BETWEEN 3000 AND 3999) EXECUTE FUNCTION slow_prepare();
"""


SLOW_COMMIT = """
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.note = 'slow commit') EXECUTE FUNCTION slow_commit();
"""


def test_a_commit_slower_than_in_doubt_after_commits_whole(sandbox, shards, names, proxy):
    """The second shard's PREPARE takes 3 s, while in-doubt recovery runs every second on what is prepared for
    over a second (in_doubt_after: 1s). Meanwhile the first shard (the decider) holds an open transaction, never a
    prepared one, so recovery has nothing of it to roll back: the commit goes through on both shards."""
    a, b = apart(names, 1300)
    direct(shards[1], SLOW_COMMIT)
    patient = start_proxy(sandbox, shards, "txn-slow-commit", routing={"in_doubt_after": "1s"})
    try:
        with connect(patient) as conn:
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'slow commit')", (a,))
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'slow commit')", (b,))
            started = time.monotonic()
            conn.commit()
            assert time.monotonic() - started > 2.5  # (the trigger did slow the commit down)
        assert notes(shards, "slow commit") == [[a], [b]]
        assert "in-doubt transaction" not in patient.log()
    finally:
        patient.stop()
        direct(shards[1], "DROP TRIGGER slow_commit ON items; DROP FUNCTION slow_commit()")


SLOW_DECISION = """
CREATE FUNCTION slow_decision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_decision AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW WHEN (NEW.note = 'decider lost') EXECUTE FUNCTION slow_decision();
"""


def terminate_once_committing(cluster, stop: threading.Event) -> None:
    """End the shard's session that runs a COMMIT, as soon as one does."""
    committing = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE state = 'active' "
                  "AND query = 'COMMIT'")
    with psycopg.connect(cluster.primary.dsn(), autocommit=True) as conn:
        while not stop.is_set() and not conn.execute(committing).fetchall():
            time.sleep(0.005)


def test_the_first_shard_lost_during_its_commit_leaves_the_outcome_to_recovery(sandbox, shards, names, proxy):
    """The first shard's COMMIT (the decision) is slow, and its session ends meanwhile: the proxy cannot know
    whether it committed, so the client gets 08007; in-doubt recovery then reads the first shard's record of the
    transaction (aborted) and rolls back the second shard's prepared transaction."""
    a, b = apart(names, 1400)
    direct(shards[0], SLOW_DECISION)
    patient = start_proxy(sandbox, shards, "txn-decider-lost", routing={"in_doubt_after": "1s"})
    stop = threading.Event()
    killer = threading.Thread(target=terminate_once_committing, args=(shards[0], stop))
    try:
        with connect(patient) as conn:
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'decider lost')", (a,))
            conn.execute("INSERT INTO items (user_id, v, note) VALUES (%s, 1, 'decider lost')", (b,))
            killer.start()
            with pytest.raises(psycopg.errors.TransactionResolutionUnknown):
                conn.commit()
        assert wait_until(lambda: not any(on_shards(shards, "SELECT gid FROM pg_prepared_xacts")), 15)
        assert notes(shards, "decider lost") == [[], []]
        assert "resolved: rollback on" in patient.log()
    finally:
        stop.set()
        if killer.is_alive():
            killer.join()
        patient.stop()
        direct(shards[0], "DROP TRIGGER slow_decision ON items; DROP FUNCTION slow_decision()")


def kill_while_preparing(proxy, cluster, stop: threading.Event) -> None:
    """SIGKILL the proxy as soon as the shard runs a PREPARE TRANSACTION: a two-phase commit in flight."""
    preparing = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                 "AND query LIKE 'PREPARE TRANSACTION %'")
    with psycopg.connect(cluster.primary.dsn(), autocommit=True) as conn:
        while not stop.is_set():
            if conn.execute(preparing).fetchone()[0]:
                proxy.signal(signal.SIGKILL)
                return
            time.sleep(0.005)


def test_a_proxy_killed_during_commits_leaves_every_transfer_whole(sandbox, shards, names, proxy):
    """SIGKILL while transfers commit in two phases (the second shard's PREPARE made slow, so that the kill lands
    between the phases: the first shard's transaction is open, the second's about to be prepared); the restarted
    proxy's recovery undoes each transaction left prepared."""
    users = keys_on(names, 0, 3000, 3) + keys_on(names, 1, 3000, 3)
    open_accounts(proxy, users)
    direct(shards[1], SLOW_PREPARE)
    doomed = start_proxy(sandbox, shards, "txn-killed", routing={"in_doubt_after": "1s"})
    try:
        for _ in range(2):
            stop = threading.Event()
            killer = threading.Thread(target=kill_while_preparing, args=(doomed, shards[1], stop))
            killer.start()
            counts = transfers(doomed, users, clients=6, seconds=6)
            stop.set()
            killer.join()
            assert doomed.process.wait(10) == -signal.SIGKILL
            assert counts["lost"] > 0, counts
            doomed.start()
            assert wait_until(lambda: not any(on_shards(shards, "SELECT gid FROM pg_prepared_xacts")), 20), \
                on_shards(shards, "SELECT gid, prepared FROM pg_prepared_xacts")
            assert balances(shards, users) == len(users) * BALANCE
        assert doomed.log().count("resolved: rollback on") >= 2
    finally:
        doomed.stop()
        direct(shards[1], "DROP TRIGGER slow_prepare ON accounts; DROP FUNCTION slow_prepare()")


# -- the same work on one unsharded server ---------------------------------------------------------------------------
def ledger_workload(conn: psycopg.Connection, seed: int) -> None:
    """Transactions of inserts, updates and deletes by key, some with savepoints, some rolled back."""
    rng = random.Random(seed)
    n = 0
    for _ in range(60):
        for _ in range(rng.randint(1, 5)):
            user = rng.randint(1, 40)
            action = rng.random()
            if action < 0.5:
                n += 1
                conn.execute("INSERT INTO ledger (user_id, n, amount) VALUES (%s, %s, %s)",
                             (user, n, rng.randint(1, 9)))
            elif action < 0.8:
                conn.execute("UPDATE ledger SET amount = amount * 2 WHERE user_id = %s", (user,))
            elif action < 0.9:
                conn.execute("DELETE FROM ledger WHERE user_id = %s AND n %% 3 = 0", (user,))
            else:
                with conn.transaction():  # a savepoint, rolled back
                    n += 1
                    conn.execute("INSERT INTO ledger (user_id, n, amount) VALUES (%s, %s, 0)", (user, n))
                    conn.execute("UPDATE ledger SET amount = -1 WHERE user_id = %s", (rng.randint(1, 40),))
                    raise psycopg.Rollback()
        if rng.random() < 0.2:
            conn.rollback()
        else:
            conn.commit()


def test_a_transactional_workload_ends_as_on_one_server(proxy, reference):
    with connect(proxy) as conn:
        ledger_workload(conn, 7)
        through_proxy = conn.execute("SELECT user_id, n, amount FROM ledger ORDER BY user_id, n").fetchall()
    with psycopg.connect(reference.primary.dsn(user="app", dbname=APP_DB)) as conn:
        ledger_workload(conn, 7)
        on_one_server = conn.execute("SELECT user_id, n, amount FROM ledger ORDER BY user_id, n").fetchall()
    assert len(on_one_server) > 50
    assert through_proxy == on_one_server


def test_session_pooling_runs_asyncpg_transactions_across_shards(session_proxy, shards, names):
    a, b = apart(names, 1100)

    async def work() -> None:
        conn = await asyncpg.connect(session_proxy.dsn(dbname=APP_DB))
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO items (user_id, note) VALUES ($1, 'session-tx')", a)
                await conn.execute("INSERT INTO items (user_id, note) VALUES ($1, 'session-tx')", b)
        finally:
            await conn.close()

    asyncio.run(work())
    assert notes(shards, "session-tx") == [[a], [b]]
