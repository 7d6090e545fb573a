"""Attack tests run against the real proxy and PostgreSQL: the integration fixtures, shared."""

from tests.integration.conftest import *  # noqa: F403
