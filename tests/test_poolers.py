"""PostgreSQL through a connection pooler (PgBouncer): what each connection sends and keeps.

PgBouncer is not installable from PyPI, so it does not run here; these tests hold what it
needs of a client, against a real PostgreSQL where they can. Every connection used to send
`options=-c statement_timeout=...` in its start-up message, which PgBouncer refuses
("unsupported startup parameter: options"), in any pool mode: no connection could be made
through it. And psycopg prepares a statement it has run five times on a connection, which a
pooler in transaction mode hands to whichever server connection comes next.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from koolbase_ota.db import create_db_engine
from tests.services import PostgresService

#: The start-up parameters PgBouncer accepts without configuration (its `ignore_startup_parameters`
#: and, from 1.20, `track_extra_parameters` add others): any other refuses the connection.
PGBOUNCER_ACCEPTS = {
    "user",
    "database",
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "standard_conforming_strings",
}
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


def _startup_parameters(listener: socket.socket) -> dict[str, str]:
    """The parameters of the first start-up message a client sends to `listener`; its SSL or
    GSS encryption requests are declined, as a server without either declines them."""
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(30)
        while True:
            length, code = struct.unpack("!II", _read(connection, 8))
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                connection.sendall(b"N")
                continue
            body = _read(connection, length - 8)
            fields = body.split(b"\0")
            return {
                name.decode(): value.decode()
                for name, value in zip(fields[0:-2:2], fields[1:-2:2], strict=True)
            }


def _read(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client hung up")
        data += chunk
    return data


def test_connections_send_only_start_up_parameters_pgbouncer_accepts() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sent: dict[str, str] = {}

        def capture() -> None:
            sent.update(_startup_parameters(listener))

        thread = threading.Thread(target=capture)
        thread.start()
        engine = create_db_engine(f"postgresql://ota@127.0.0.1:{port}/ota", timeout_seconds=2)
        try:
            with pytest.raises(OperationalError), engine.connect():
                pass  # the listener hangs up after the start-up message
        finally:
            engine.dispose()
            thread.join(30)
    assert sent.get("user") == "ota"
    assert sent.get("database") == "ota"
    assert set(sent) <= PGBOUNCER_ACCEPTS, sent


def test_the_statement_timeout_still_applies(postgres: PostgresService) -> None:
    engine = create_db_engine(postgres.create_database(), timeout_seconds=1)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "1s"
            started = time.monotonic()
            with pytest.raises(OperationalError, match="statement timeout"):
                connection.execute(text("SELECT pg_sleep(30)"))
            assert time.monotonic() - started < 20
    finally:
        engine.dispose()


def test_no_statement_is_prepared_on_the_server(postgres: PostgresService) -> None:
    """Behind a pooler in transaction mode, a prepared statement lives on one server
    connection; the client's next transaction may run on another."""
    engine = create_db_engine(postgres.create_database(), timeout_seconds=10)
    try:
        with engine.connect() as connection:
            for n in range(20):
                assert connection.execute(text("SELECT :n + 1"), {"n": n}).scalar_one() == n + 1
            prepared = connection.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            assert prepared.scalar_one() == 0
    finally:
        engine.dispose()


def test_a_wait_given_its_own_timeout_is_left_to_psycopg(postgres: PostgresService) -> None:
    """Only the waits psycopg gives no timeout are bounded: `notifies(timeout=...)` ends its
    wait on that timeout, and the connection stays open."""
    engine = create_db_engine(postgres.create_database(), timeout_seconds=10)
    try:
        with engine.connect() as connection:
            dbapi_connection = connection.connection.dbapi_connection
            assert dbapi_connection is not None
            assert list(dbapi_connection.notifies(timeout=0.2)) == []
            assert not dbapi_connection.closed
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
