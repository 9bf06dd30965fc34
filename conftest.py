"""Root conftest: registers the real-cluster fixtures (tests/cluster/plugin.py) for every test."""

pytest_plugins = ["tests.cluster.plugin"]
