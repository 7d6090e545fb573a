"""Attack tests run the real proxy against real PostgreSQL: the integration fixtures, shared."""

from tests.integration.conftest import *  # noqa: F403
