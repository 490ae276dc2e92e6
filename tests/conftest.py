# Shared fixtures live in tests/fixtures/*.py, one module per concern.
pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.model",
    "tests.fixtures.k8s",
    "tests.fixtures.ci",
]
