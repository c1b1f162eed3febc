"""The SQL store of batch runs on the real MariaDB and on SQLite: claims, leases, write-backs, run guards."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tasks import db
from tasks.items import ItemStore, runs_of
from tasks.runs import RunRefused, RunStore


@pytest.fixture(params=["mariadb", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """Empty batch tables on the test MariaDB, or in a fresh SQLite file made by the migrations."""
    if request.param == "mariadb":
        yield request.getfixturevalue("batch_tables")
        return
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db.upgrade(url)
    engine = db.create_engine(url)
    yield engine
    engine.dispose()


def started_run(engine: sa.Engine, count: int, model: str = "iris") -> tuple[ItemStore, RunStore, int]:
    items, runs = ItemStore(engine, lease_s=60, max_attempts=3), RunStore(engine, max_attempts=3)
    items.register(model, 1, ["[5.1, 3.5, 1.4, 0.2]"] * count)
    run = runs.start(runs.create(model, "test").id)
    assert run is not None and run.total == count
    return items, runs, run.id


def attempts(engine: sa.Engine) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(sa.select(db.items.c.attempts)).scalars())


def test_runs_of_ids_are_the_spans_they_make():
    assert runs_of([]) == [] and runs_of([4]) == [(4, 4)]
    assert runs_of([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 8), (10, 10)]


def test_concurrent_claims_take_each_item_exactly_once(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 2000)
    run = runs.get(run_id)
    taken: list[list[int]] = [[] for _ in range(4)]

    def claimer(n: int) -> None:
        while batch := items.claim(run_id, "iris", (0, run.high_water), f"token-{n}-{len(taken[n])}", 50):
            taken[n].extend(item.id for item in batch)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [i for ids in taken for i in ids]
    assert len(every) == len(set(every)) == 2000
    assert sum(1 for ids in taken if ids) >= 2  # the claimers really ran side by side
    with engine.connect() as connection:
        rows = connection.execute(sa.select(db.items.c.status, db.items.c.attempts, db.items.c.run_id)).all()
    assert set(rows) == {("running", 1, run_id)}


def test_a_write_back_lands_only_where_the_claim_still_holds(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 3)
    run = runs.get(run_id)
    first = items.claim(run_id, "iris", (0, run.high_water), "first", 10)
    with engine.begin() as connection:  # the first claimer's worker was lost: its lease runs out
        connection.execute(db.items.update().values(leased_until=db.now() - datetime.timedelta(seconds=1)))
    assert items.expire_leases(["iris"]) == {run_id: 3}
    second = items.claim(run_id, "iris", (0, run.high_water), "second", 10)
    assert [i.id for i in second] == [i.id for i in first] and attempts(engine) == {2}
    assert not items.finish(run_id, "first", {i.id: '"late"' for i in first}, {}).complete
    assert items.finish(run_id, "second", {i.id: '"fresh"' for i in second}, {}).complete
    with engine.connect() as connection:
        assert connection.execute(sa.select(db.items.c.prediction).distinct()).scalars().all() == ['"fresh"']
    assert (runs.get(run_id).succeeded, runs.get(run_id).failed) == (3, 0)
    assert runs.finish_if_done(run_id) and runs.get(run_id).status == "succeeded"


def test_items_whose_worker_is_lost_too_often_fail_with_that_reason(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 2)
    run = runs.get(run_id)
    for attempt in range(3):
        assert len(items.claim(run_id, "iris", (0, run.high_water), f"t{attempt}", 10)) == 2
        with engine.begin() as connection:
            connection.execute(db.items.update().values(leased_until=db.now() - datetime.timedelta(seconds=1)))
        back = items.expire_leases(["iris"])
        assert back == ({run_id: 2} if attempt < 2 else {})
    shown = items.page("iris", "failed", 1, 10)[0]
    assert len(shown) == 2 and all("lost 3 times" in i["error"] and i["retries_left"] == 0 for i in shown)
    assert runs.get(run_id).failed == 2
    assert runs.finish_if_done(run_id)


def test_a_retried_chunk_takes_back_what_its_lost_attempt_held(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 5)
    held = items.claim(run_id, "iris", (0, runs.get(run_id).high_water), "task-id", 3)
    again = items.reclaim("iris", (0, runs.get(run_id).high_water), "task-id")
    assert [i.id for i in again] == [i.id for i in held]
    with engine.connect() as connection:
        assert connection.execute(sa.select(db.items.c.attempts).where(db.items.c.claim == "task-id")
                                  .distinct()).scalars().all() == [2]
    assert items.reclaim("iris", (0, runs.get(run_id).high_water), "another-task") == []
    assert {i["status"] for i in items.page("iris", None, 1, 10)[0]} == {"running", "queued"}


def test_a_run_takes_in_only_what_was_queued_when_it_started(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 4)
    items.register("iris", 1, ["[1, 2, 3, 4]"] * 2)  # arrive after the start: the next run's
    run = runs.get(run_id)
    claimed = items.claim(run_id, "iris", (0, run.high_water), "t", 100)
    assert len(claimed) == 4
    assert items.finish(run_id, "t", {i.id: "1" for i in claimed}, {}).complete
    assert runs.finish_if_done(run_id)
    assert runs.get(runs.create("iris", "test").id).total == 0
    assert runs.start(runs.active_of("iris")).total == 2


def test_one_active_run_per_model_and_one_run_per_schedule_period(engine: sa.Engine):
    runs = RunStore(engine, max_attempts=3)
    first = runs.create("iris", "schedule 60", "p1")
    with pytest.raises(RunRefused) as refused:
        runs.create("iris", "api")
    assert refused.value.active == first.id
    other = runs.create("digits-light", "api")
    runs.fail(first.id, "stopped for the test")
    with pytest.raises(RunRefused) as ran:
        runs.create("iris", "schedule 60", "p1")
    assert ran.value.active is None and "period" in str(ran.value)
    assert runs.create("iris", "schedule 60", "p2").active == "iris"
    assert {r.id for r in runs.live()} == {other.id, runs.active_of("iris")}


def test_spans_cut_a_run_s_queued_items_into_chunks(engine: sa.Engine):
    items, runs, run_id = started_run(engine, 2500)
    run = runs.get(run_id)
    spans = runs.spans(run, 1000)
    assert len(spans) == 3 and spans[-1][1] == run.high_water
    claimed = [items.claim(run_id, "iris", span, f"t{n}", 1000) for n, span in enumerate(spans)]
    assert [len(c) for c in claimed] == [1000, 1000, 500]
    assert runs.spans(run, 1000) == []
    items.finish(run_id, "t1", {}, {i.id: "bad" for i in claimed[1]})
    assert runs.spans(runs.get(run_id), 1000) == []  # failed in this run: for the next run to retry
