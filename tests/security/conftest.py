"""Attack tests reuse the integration fixtures: the real proxy in front of real PostgreSQL 15."""

from tests.integration.conftest import *  # noqa: F403
