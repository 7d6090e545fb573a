"""Attack tests run the real proxy in front of the real PostgreSQL: the integration fixtures."""

from tests.integration.conftest import *  # noqa: F403
