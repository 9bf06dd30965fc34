"""Optuna's own contract suite for storages (the 46 tests of ``optuna.testing.pytest_storages``),
run against WriteThroughStorage on SQLite and on a real PostgreSQL server."""

import pytest
import sqlalchemy
from optuna.testing.pytest_storages import StorageTestCase

from speechtune.storage import WriteThroughStorage, open_rdb
from tests.support.postgres import postgres_server


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        yield WriteThroughStorage(open_rdb(f"sqlite:///{tmp_path}/contract.db"))
        return
    server = request.getfixturevalue("postgres")
    url = server.url
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:  # every contract test starts from an empty database
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    storage = WriteThroughStorage(open_rdb(url))
    yield storage
    storage.rdb.engine.dispose()


class TestWriteThroughStorage(StorageTestCase):
    pass
