"""The write ledger's judgement (tests/integration/ledger.py): what it calls lost, doubled,
wrongly stored or settled, from what the tills noted and what the table holds."""

from __future__ import annotations

import pytest

from tests.integration.ledger import Ledger, Outcome, Sale, is_clean_error


def _noted(ledger: Ledger, outcome: Outcome) -> Sale:
    sale = ledger.new_sale("till0")
    ledger.note([sale], outcome)
    return sale


def _row(sale: Sale) -> tuple[str, int]:
    return (sale.till, sale.amount)


def test_a_sound_table_passes_and_unknowns_are_settled_by_the_read_back() -> None:
    ledger = Ledger()
    committed = _noted(ledger, Outcome.COMMITTED)
    _noted(ledger, Outcome.FAILED)
    unknown_kept = _noted(ledger, Outcome.UNKNOWN)
    _noted(ledger, Outcome.UNKNOWN)
    report = ledger.check({committed.sale_id: [_row(committed)], unknown_kept.sale_id: [_row(unknown_kept)]})
    report.assert_sound()
    assert (report.committed, report.failed, report.unknown) == (1, 1, 2)
    assert (report.unknown_stored, report.unknown_absent) == (1, 1)


def test_a_committed_sale_missing_from_the_table_is_lost() -> None:
    ledger = Ledger()
    committed = _noted(ledger, Outcome.COMMITTED)
    report = ledger.check({})
    assert report.lost == (committed.sale_id,)
    with pytest.raises(AssertionError, match="lost commits"):
        report.assert_sound()


def test_a_sale_stored_twice_is_doubled() -> None:
    ledger = Ledger()
    sale = _noted(ledger, Outcome.UNKNOWN)
    report = ledger.check({sale.sale_id: [_row(sale), _row(sale)]})
    assert report.doubled == (sale.sale_id,)
    with pytest.raises(AssertionError, match="doubled writes"):
        report.assert_sound()


def test_a_failed_sale_in_the_table_or_a_changed_or_unknown_row_is_caught() -> None:
    ledger = Ledger()
    failed = _noted(ledger, Outcome.FAILED)
    changed = _noted(ledger, Outcome.COMMITTED)
    report = ledger.check(
        {
            failed.sale_id: [_row(failed)],
            changed.sale_id: [(changed.till, changed.amount + 1)],
            "nobody-sent-this": [("till9", 1)],
        }
    )
    assert report.failed_but_stored == (failed.sale_id,)
    assert report.altered == (changed.sale_id,)
    assert report.strangers == ("nobody-sent-this",)
    with pytest.raises(AssertionError, match="failed sales stored"):
        report.assert_sound()


def test_a_sale_sent_but_never_noted_is_refused() -> None:
    ledger = Ledger()
    ledger.new_sale("till0")
    with pytest.raises(AssertionError, match="never noted"):
        ledger.check({})


def test_a_sale_noted_twice_is_refused() -> None:
    ledger = Ledger()
    sale = _noted(ledger, Outcome.FAILED)
    with pytest.raises(AssertionError, match="noted twice"):
        ledger.note([sale], Outcome.COMMITTED)


@pytest.mark.parametrize(
    ("sqlstate", "message", "clean"),
    [
        ("57P01", "terminating connection due to administrator command", True),
        ("08006", "lost the connection to the database server", True),
        ("08001", "could not connect to the database server", True),
        (None, "connection failed: FATAL:  could not connect to the database server", True),
        (None, "InterfaceError: cannot perform operation: connection is closed", True),
        ("25P02", "current transaction is aborted", False),
        ("XX000", "internal error", False),
        (None, "received 2 results from command 'BEGIN'", False),
        (None, "TimeoutError: no answer while committing", False),
    ],
)
def test_only_errors_of_a_lost_or_unavailable_server_are_clean(
    sqlstate: str | None, message: str, clean: bool
) -> None:
    assert is_clean_error(sqlstate, message) is clean
