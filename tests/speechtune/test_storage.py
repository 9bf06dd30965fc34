"""The write-through storage against real databases: SQLite and a real PostgreSQL server."""

import threading
import time

import optuna
import sqlalchemy
import pytest
from optuna.trial import TrialState

from speechtune.storage import StorageUnavailable, WriteThroughStorage, open_rdb, redact
from tests.support.postgres import postgres_server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/study.db"
    else:
        with postgres_server() as server:
            yield server.url


def fill(study, n):
    for _ in range(n):
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        trial.report(0.5, 1)
        trial.report(0.4, 2)
        trial.set_user_attr("metrics", {"wer": 0.4, "cer": 0.2})
        study.tell(trial, 0.4 - trial.number / 100)


def test_every_write_is_in_the_database_when_the_call_returns(database_url):
    study = optuna.create_study(study_name="s", storage=WriteThroughStorage(open_rdb(database_url)))
    fill(study, 3)
    pruned = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
    pruned.report(0.9, 1)
    study.tell(pruned, state=TrialState.PRUNED)

    plain = optuna.load_study(study_name="s", storage=database_url)  # Optuna's own reader
    assert [(t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs) for t in plain.trials] == [
        (t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs) for t in study.trials
    ]
    assert plain.best_trial.number == 2
    assert plain.trials[0].datetime_start == study.trials[0].datetime_start


def test_reopening_loads_the_study_and_numbers_continue(database_url):
    first = optuna.create_study(study_name="s", storage=WriteThroughStorage(open_rdb(database_url)))
    fill(first, 4)
    second = optuna.load_study(study_name="s", storage=WriteThroughStorage(open_rdb(database_url)))
    assert len(second.trials) == 4
    fill(second, 1)
    assert [t.number for t in optuna.load_study(study_name="s", storage=database_url).trials] == [0, 1, 2, 3, 4]


def test_a_batch_commits_all_or_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    storage = WriteThroughStorage(open_rdb(url))
    study = optuna.create_study(study_name="s", storage=storage)
    with storage.batch():
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        assert optuna.load_study(study_name="s", storage=url).trials == [], "nothing is committed inside the batch"
    assert optuna.load_study(study_name="s", storage=url).trials[0].params == trial.params


def test_unreachable_database_is_a_clear_error_without_the_password():
    url = "postgresql+psycopg://tuner:s3cret@127.0.0.1:1/speechtune"
    with pytest.raises(StorageUnavailable) as caught:
        open_rdb(url)
    assert "127.0.0.1:1" in str(caught.value) and "s3cret" not in str(caught.value)
    assert redact(url) == "postgresql+psycopg://tuner:***@127.0.0.1:1/speechtune"


def test_database_outage_longer_than_the_retry_window_is_a_clear_error_and_loses_nothing_committed():
    with postgres_server() as server:
        storage = WriteThroughStorage(open_rdb(server.url), retry_seconds=2)
        study = optuna.create_study(study_name="s", storage=storage)
        fill(study, 2)
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        server.stop()
        with pytest.raises(StorageUnavailable, match="unreachable for 2 s"):
            trial.report(0.3, 1)
        server.start()
        kept = optuna.load_study(study_name="s", storage=server.url).trials
        assert [t.state for t in kept] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
        assert kept[2].params == trial.params


def test_short_database_outage_is_ridden_out_by_retrying():
    with postgres_server() as server:
        storage = WriteThroughStorage(open_rdb(server.url), retry_seconds=60)
        study = optuna.create_study(study_name="s", storage=storage)
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
        server.stop()
        restart = threading.Timer(2.0, server.start)
        restart.start()
        trial.report(0.3, 1)  # blocks, retrying, until the server is back
        restart.join()
        assert optuna.load_study(study_name="s", storage=server.url).trials[0].intermediate_values == {1: 0.3}


def test_the_retry_window_is_one_per_study_from_the_first_failed_commit():
    """Issue 14: each trial's commit opened its own window, so with 4 trials a 60 s window became 230 s."""
    with postgres_server() as server:
        storage = WriteThroughStorage(open_rdb(server.url), retry_seconds=3)
        study = optuna.create_study(study_name="s", storage=storage)
        trials = [study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}) for _ in range(4)]
        server.stop()
        began = time.monotonic()
        for trial in trials:  # as four trial tasks would, one after the other
            with pytest.raises(StorageUnavailable):
                trial.report(0.3, 1)
        assert time.monotonic() - began < 3 + 2, "later commits in the same outage do not get a window of their own"
        server.start()
        trials[0].report(0.2, 2)  # the database is back: a new outage would get a new window
        assert optuna.load_study(study_name="s", storage=server.url).trials[0].intermediate_values == {2: 0.2}


def test_a_commit_whose_outcome_is_unknown_is_retried_without_writing_anything_twice(database_url):
    """A connection lost during COMMIT (PostgreSQL stopped at that moment) leaves it unknown whether the transaction
    landed. Retrying it inserted its rows again: an IntegrityError that stopped the study (seen when the chaos test
    stopped PostgreSQL mid-study), or, for a new trial, a second row with the same trial number."""
    storage = WriteThroughStorage(open_rdb(database_url), retry_seconds=10)
    study = optuna.create_study(study_name="s", storage=storage)
    lose = []

    def lands_but_the_answer_is_lost(connection):
        if lose:
            lose.pop()
            connection.connection.dbapi_connection.commit()
            raise sqlalchemy.exc.OperationalError("COMMIT", None, ConnectionError("server closed the connection unexpectedly"))

    sqlalchemy.event.listen(storage.rdb.engine, "commit", lands_but_the_answer_is_lost)
    distributions = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    writes = [
        lambda: study.ask(distributions),
        lambda: optuna.Trial(study, study.trials[0]._trial_id).report(0.5, 1),
        lambda: optuna.Trial(study, study.trials[0]._trial_id).set_user_attr("metrics", {"wer": 0.5}),
        lambda: study.set_user_attr("objective", "wer"),
        lambda: study.tell(0, 0.5),
        lambda: study.enqueue_trial({"lr": 1e-3}, user_attrs={"requeued_from": 0}),
    ]
    for write in writes:
        lose.append(True)
        write()
        assert not lose, "the commit was made to fail"
    plain = optuna.load_study(study_name="s", storage=database_url)
    assert [(t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs) for t in plain.trials] == [
        (t.number, t.state, t.params, t.intermediate_values, t.values, t.user_attrs) for t in study.trials
    ]
    assert len(plain.trials) == 2 and plain.user_attrs == {"objective": "wer"}
