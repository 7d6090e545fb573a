"""``python -m proxy``: the same as the ``pos-proxy`` command."""

from proxy.cli import main

raise SystemExit(main())
