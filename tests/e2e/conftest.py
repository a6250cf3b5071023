"""The real Prefect server and the deployments on it (module-scoped fixtures, see tests/prefect_stack.py)."""

from tests.prefect_stack import deployed, server  # noqa: F401 - fixtures are used by name
