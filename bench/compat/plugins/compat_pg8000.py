"""pytest plugin for pg8000's suite (loaded with ``-p compat_pg8000`` by bench/compat/run.py).

pg8000's conftest reads only PGHOST, PGPORT and PGPASSWORD, and pg8000 speaks plaintext unless
given an ``ssl_context``; the database and the proxy accept TLS only.  This gives every
connection that did not choose its own TLS (``ssl_context`` left at None) a verify-full context
from PGSSLROOTCERT (with the client certificate PGSSLCERT/PGSSLKEY when set), and the database
PGDATABASE when none was given.  A test that passes ``ssl_context=False`` keeps its plaintext.
"""

from __future__ import annotations

import functools
import inspect
import os
import ssl
from typing import Any

import pg8000.core  # type: ignore[import-not-found,unused-ignore]  # in the suites venv only


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=os.environ["PGSSLROOTCERT"])
    if os.environ.get("PGSSLCERT"):
        context.load_cert_chain(os.environ["PGSSLCERT"], os.environ.get("PGSSLKEY"))
    return context


def _patch() -> None:
    original = pg8000.core.CoreConnection.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        uses_tcp = bound.arguments["unix_sock"] is None and bound.arguments["sock"] is None
        if uses_tcp and bound.arguments["ssl_context"] is None and "PGSSLROOTCERT" in os.environ:
            bound.arguments["ssl_context"] = _tls_context()
        if bound.arguments["database"] is None and "PGDATABASE" in os.environ:
            bound.arguments["database"] = os.environ["PGDATABASE"]
        original(*bound.args, **bound.kwargs)

    pg8000.core.CoreConnection.__init__ = init  # type: ignore[method-assign,unused-ignore]


_patch()
