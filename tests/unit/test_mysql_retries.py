"""Deadlock victims and lock wait timeouts (errors 1213, 1205) are run again; nothing else is."""
from __future__ import annotations

import pytest
from pymysql.err import OperationalError

from feature_store.online.mysql import _TXN_ATTEMPTS, _in_transaction, _retry_deadlocks


def test_a_statement_the_server_rolled_back_for_a_deadlock_is_run_again():
    calls: list[tuple] = []

    def flaky(*args: object) -> int:
        calls.append(args)
        if len(calls) < 3:
            raise OperationalError(1213 if len(calls) == 1 else 1205, "try restarting transaction")
        return 7

    assert _retry_deadlocks(flaky, "sql", [b"v"]) == 7 and calls == [("sql", [b"v"])] * 3

    def always() -> None:
        calls.append(())
        raise OperationalError(1213, "Deadlock found")

    calls.clear()
    with pytest.raises(OperationalError):
        _retry_deadlocks(always)
    assert len(calls) == _TXN_ATTEMPTS

    def other() -> None:  # any other error is not retried
        calls.append(())
        raise OperationalError(1045, "Access denied")

    calls.clear()
    with pytest.raises(OperationalError, match="Access denied"):
        _retry_deadlocks(other)
    assert len(calls) == 1


class FakeConnection:
    """Records begin / commit / rollback, as a pymysql connection would see them."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def begin(self) -> None:
        self.log.append("begin")

    def commit(self) -> None:
        self.log.append("commit")

    def rollback(self) -> None:
        self.log.append("rollback")


def test_a_transaction_rolled_back_for_a_deadlock_runs_again_whole():
    conn = FakeConnection()
    tries: list[int] = []

    def body(c: FakeConnection) -> bool:
        tries.append(1)
        c.log.append("write")
        if len(tries) == 1:
            raise OperationalError(1213, "Deadlock found when trying to get lock; try restarting transaction")
        return True

    assert _in_transaction(conn, body) is True  # type: ignore[arg-type]
    assert conn.log == ["begin", "write", "rollback", "begin", "write", "commit"]


def test_a_transaction_the_body_declines_is_rolled_back_and_other_errors_are_raised():
    conn = FakeConnection()
    assert _in_transaction(conn, lambda c: False) is False  # type: ignore[arg-type]
    assert conn.log == ["begin", "rollback"]

    def lost(c: FakeConnection) -> bool:
        raise OperationalError(2013, "Lost connection to server during query")

    conn = FakeConnection()
    with pytest.raises(OperationalError, match="Lost connection"):
        _in_transaction(conn, lost)  # type: ignore[arg-type]
    assert conn.log == ["begin", "rollback"]  # once: the caller decides about lost connections
