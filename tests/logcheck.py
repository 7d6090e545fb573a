"""Did a proxy process hit an error nothing handled?  Checked on every proxy a test starts.

Such an error leaves the client's test passing (the session may even recover) while the proxy
logged a bug: an ``internal_error`` event (proxy/eventloop.py) or a plain-text traceback from
anything that bypasses it.  Tests that provoke one on purpose read the log themselves.
"""

from __future__ import annotations

import json

PLAIN_TEXT_MARKERS = (
    "Traceback (most recent call last)",
    "Exception in callback",
    "exception was never retrieved",
)


def unhandled_errors(log_text: str) -> list[str]:
    """Each report of an unhandled error: a JSON line, or a plain-text one with the lines after it
    up to the next JSON line (the traceback)."""
    found: list[str] = []
    in_plain_report = False
    for line in log_text.splitlines():
        if line.startswith("{"):
            in_plain_report = False
            try:
                event = json.loads(line).get("event")
            except ValueError:
                continue
            if event == "internal_error":
                found.append(line)
        elif any(marker in line for marker in PLAIN_TEXT_MARKERS):
            found.append(line)
            in_plain_report = True
        elif in_plain_report:
            found[-1] += "\n" + line
    return found


def assert_no_unhandled_errors(log_text: str, where: str) -> None:
    errors = unhandled_errors(log_text)
    assert not errors, f"{where} logged {len(errors)} unhandled error(s):\n" + "\n".join(errors)[-6000:]
