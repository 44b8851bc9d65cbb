"""The redaction layer (worker/redact.py): secrets and patient data masked, the names a user needs kept.

Pure unit tests: driver messages as PostgreSQL/libpq, PyMySQL/MariaDB, SQLAlchemy and paramiko word them.
"""

from __future__ import annotations

import random
import re
import time

import pytest

from worker.redact import MASK, redact

PRIVATE_USE = re.compile("[\ue000-\uf8ff]")

# Messages that must come out exactly as they went in: every name in them is in a driver position.
KEPT_VERBATIM = [
    # psycopg / libpq / PostgreSQL
    'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "no_such_db" does not exist',
    'connection to server at "pg.internal" (10.0.0.5), port 5432 failed: Connection refused',
    'connection to server at "::1", port 5433 failed: Connection refused',
    'FATAL:  password authentication failed for user "migrator"',
    'FATAL:  role "x" does not exist',
    'relation "clinical.patients" does not exist',
    'column "foo" of relation "bar" does not exist',
    'null value in column "notes" of relation "patients" violates not-null constraint',
    'duplicate key value violates unique constraint "uq_patients_legacy"',
    'insert or update on table "visits" violates foreign key constraint "fk_visits_patient"',
    "value too long for type character varying(120)",
    'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or directory',
    'could not translate host name "pg.internal" to address: Name or service not known',
    'schema "clinical" does not exist',
    'no pg_hba.conf entry for host "10.0.0.7", user "migrator", database "clinical", no encryption',
    "fe_sendauth: no password supplied",
    # PyMySQL / MariaDB (str() of the exception is the repr of its args)
    "(1049, \"Unknown database 'nope'\")",
    "(1045, \"Access denied for user 'reader'@'10.0.0.7' (using password: YES)\")",
    "(1045, \"Access denied for user ''@'localhost' (using password: NO)\")",
    "(1044, \"Access denied for user 'reader'@'%' to database 'his'\")",
    "(2003, \"Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection refused)\")",
    "(2005, \"Unknown MySQL server host 'db.host' (-2)\")",
    "(1146, \"Table 'his.pacientes' doesn't exist\")",
    "(1054, \"Unknown column 'x' in 'field list'\")",
    "(1130, \"Host '10.0.0.7' is not allowed to connect to this MariaDB server\")",
    "(1048, \"Column 'apellidos' cannot be null\")",
    "(1406, \"Data too long for column 'notes' at row 1\")",
    "(2013, 'Lost connection to MySQL server during query')",
    "Table 'his.pacientes' doesn't exist",
    "Unknown column 'x' in 'field list'",
    # SQLAlchemy wrapping
    "(pymysql.err.OperationalError) (1049, \"Unknown database 'nope'\")\n"
    "(Background on this error at: https://sqlalche.me/e/20/e3q8)",
    '(psycopg.OperationalError) connection failed: connection to server at "10.0.0.7", port 5432 failed',
    # URLs without credentials
    "connecting to postgresql+psycopg://db.internal:5432/clinical",
    "connecting to postgresql://[::1]:5432/clinical",
    # paramiko / SSH (resources/ssh.py words some of these)
    "cannot reach legacy-host:22: [Errno 111] Connection refused",
    "cannot reach 10.0.0.7:22: timed out",
    "[Errno None] Unable to connect to port 22 on 127.0.0.1",
    "host key of legacy-host:22 changed: refusing to connect",
    "legacy-host:2222 is not in known_hosts: refusing to connect",
    "Server '[legacy-host]:2222' not found in known_hosts",
    "key authentication as deploy was refused",
    "Bad authentication type; allowed types: ['publickey', 'password']",
    # ordinary worker lines
    "batch 12 of patients for HSJ committed in 0.4 s",
]


@pytest.mark.parametrize("line", KEPT_VERBATIM)
def test_names_in_driver_positions_are_kept(line: str) -> None:
    assert redact(line) == line


# Kept and masked in one message: the exact result.
MIXED = [
    ("mysql+pymysql://reader:s3cret@db.host:3306/his", "mysql+pymysql://***@db.host:3306/his"),
    ("postgresql+psycopg://migrator@10.0.0.7/clinical failed", "postgresql+psycopg://***@10.0.0.7/clinical failed"),
    ("postgresql://u:p@ss/w@rd@db.host/clinical", "postgresql://***@db.host/clinical"),
    ("postgresql://u:pw@h/db?sslmode=require&password=x", "postgresql://***@h/db?sslmode=require&password=***"),
    (
        'duplicate key value violates unique constraint "uq_patients_legacy"\n'
        "DETAIL:  Key (sistema, national_id)=(HSJ, 123) already exists.",
        'duplicate key value violates unique constraint "uq_patients_legacy"\n'
        "DETAIL:  Key (sistema, national_id)=(***) already exists.",
    ),
    (
        'new row for relation "patients" violates check constraint "ck_birth"\n'
        "DETAIL:  Failing row contains (7, HSJ, Ana María, 1020304).",
        'new row for relation "patients" violates check constraint "ck_birth"\nDETAIL:  Failing row contains (***)',
    ),
    ('invalid input syntax for type date: "31/02/2001"', 'invalid input syntax for type date: "***"'),
    ('invalid input value for enum sexo: "X"', 'invalid input value for enum sexo: "***"'),
    (
        'CONTEXT:  COPY patients, line 3, column national_id: "1020304050"',
        'CONTEXT:  COPY patients, line 3, column national_id: "***"',
    ),
    (
        "(1062, \"Duplicate entry 'O'Brien-1020304' for key 'uq_pacientes_doc'\")",
        "(1062, \"Duplicate entry '***' for key 'uq_pacientes_doc'\")",
    ),
    (
        "(1292, \"Incorrect datetime value: '31/02/2001' for column 'fecha_nac' at row 1\")",
        "(1292, \"Incorrect datetime value: '***' for column 'fecha_nac' at row 1\")",
    ),
    (
        "(1366, \"Incorrect string value: 'Gómez\\nRuiz' for column 'notas' at row 1\")",
        "(1366, \"Incorrect string value: '***' for column 'notas' at row 1\")",
    ),
    ('could not translate host name "evil host" to address', 'could not translate host name "***" to address'),
    ("documento 10.203.40.5 en la nota", "documento *** en la nota"),
]


@pytest.mark.parametrize(("line", "expected"), MIXED)
def test_names_are_kept_and_values_masked_in_one_message(line: str, expected: str) -> None:
    assert redact(line) == expected


# (line, what must not survive)
MASKED = [
    ("connecting to postgresql+psycopg://migrator:Sup3r-Secret@db:5432/clinical", "Sup3r-Secret"),
    ("connecting to postgresql+psycopg://migrator:Sup3r-Secret@db:5432/clinical", "migrator"),
    ("mysql+pymysql://root:hunter2@10.0.0.1/his failed", "hunter2"),
    ("mysql+pymysql://root:pa/ss'w\"d@10.0.0.1/his failed", "ss'w"),
    ("password=hunter2 host=x", "hunter2"),
    ("PASSWORD: 'hunter 2'", "hunter 2"),
    ("pwd: hunter2", "hunter2"),
    ("token=abc.def.ghi", "abc.def.ghi"),
    ('api key "sk-live-123"', "sk-live-123"),
    ('password=hunter2 password authentication failed for user "migrator"', "hunter2"),
    ("hash pbkdf2_sha256$600000$salt$abcdef== leaked", "pbkdf2_sha256$600000$salt$abcdef=="),
    ("hash argon2$argon2id$v=19$m=102400,t=2,p=8$c2FsdA$aGFzaA leaked", "c2FsdA"),
    ("mysql://pbkdf2_sha256$600000$salt$abcdef==", "salt$abcdef"),
    ("cannot reach pbkdf2_sha256$600000$salt$abcdef==", "salt$abcdef"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXk"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n(truncated", "MIIEowIBAAKCAQEA"),
    ("DETAIL:  Key (sistema, national_id)=(HSJ, 1020304) already exists.", "1020304"),
    ('DETAIL:  Key (notes)=(see table "Gómez") is not present in table "patients".', "Gómez"),
    ("Failing row contains (7, HSJ, Ana María, 1020304).", "Ana María"),
    ('Failing row contains (7, user "Gomez", database "x").', "Gomez"),
    ("Incorrect datetime value: '31/02/2001' for column", "31/02/2001"),
    ('invalid input "Gómez Ruiz"', "Gómez Ruiz"),
    ("invalid input syntax for type integer: \"table 'Gomez'\"", "Gomez"),
    ('invalid input syntax for type date: "31/02/2001" for column "x"', "31/02/2001"),
    ("mail ana.gomez@mail.com bounced", "ana.gomez@mail.com"),
    ('role "ana.gomez@mail.com" does not exist', "ana.gomez@mail.com"),
    ("cannot reach ana.gomez@mail.com:22", "gomez@mail"),
    ("call +57 300 123 4567 now", "300 123 4567"),
    ("call (+57) 300-123 4567 now", "300-123 4567"),
    ("doc 1020304050", "1020304050"),
    ("cédula 1.020.304.567 en la nota", "1.020.304.567"),
    ('could not translate host name "1.020.304.567" to address', "1.020.304.567"),
    ('role "1020304050" does not exist', "1020304050"),
    ("[SQL: INSERT ...]\n[parameters: ('Ana', 'Gómez')]", "Gómez"),
    ("[SQL: INSERT ...]\n[parameters: ('database', 'Gomez')]", "Gomez"),
    ("nota: 'paciente refiere dolor'", "paciente refiere dolor"),
    ("(1062, \"Duplicate entry 'Ana María' for key 'uq_x'\")", "Ana María"),
    ("(1062, \"Duplicate entry 'I can't walk' for key 'uq_x'\")", "walk"),
    ("Truncated incorrect DOUBLE value: 'don't know'", "know"),
    ("(1064, \"You have an error in your SQL syntax; near 'Ana María' at line 1\")", "Ana María"),
    ("(1234, 'Ana María')", "Ana María"),
    ('row (12, "Ana María")', "Ana María"),
]


@pytest.mark.parametrize(("line", "secret"), MASKED)
def test_secrets_and_patient_data_are_masked(line: str, secret: str) -> None:
    assert secret not in redact(line)


# Hostile inputs: what is masked today must not become "kept" by dressing it up.
HOSTILE = [
    # a "host" with a space, or a quote inside: not a name
    ('connection to server at "Ana María", port 5432 failed', "Ana María"),
    ("(2003, \"Can't connect to MySQL server on 'Ana María' (timed out)\")", "Ana María"),
    ("(2003, \"Can't connect to MySQL server on 'O'Brien Ruiz' (timed out)\")", "Ruiz"),
    ('could not translate host name "a"Ana" to address', "Ana"),
    ("Unknown database 'Gómez Ruiz'", "Gómez Ruiz"),
    ("Access denied for user 'Ana María'@'10.0.0.7'", "Ana María"),
    # a very long token is not a name
    (f'database "{"a" * 129}" does not exist', "a" * 129),
    (f'connection to server at "{"h" * 200}", port 5432 failed', "h" * 200),
    # an IP-shaped document outside a host position
    ("documento 10.203.40.5 del paciente", "10.203.40.5"),
    ("paciente con documento 10.203.40.5:22", "10.203.40.5"),
    # keywords next to, but not naming, a value
    ('user = "Gomez"', "Gomez"),
    ("user: 'Gomez'", "Gomez"),
    ('database "x"y" exists', 'y"'),
    ("key 'secret-value'", "secret-value"),
    ("type \"Gomez\" was not found in column 'x' of 'Gomez'", "of 'Gomez'"),
]


@pytest.mark.parametrize(("line", "secret"), HOSTILE)
def test_hostile_inputs_are_not_kept(line: str, secret: str) -> None:
    assert secret not in redact(line)


@pytest.mark.parametrize(
    "line",
    [
        "nota '\ue000' \ue001 database \"x\"",
        "'Ana\ue000 María' database \"x\"",
        "\ue000\ue001\ue002\uf8ff",
        "Failing row contains (\ue000)",
        "(1049, \"Unknown database '\ue000'\")",
    ],
)
def test_placeholder_characters_cannot_be_smuggled_in(line: str) -> None:
    result = redact(line)
    assert not PRIVATE_USE.search(result)
    assert "Ana" not in result
    assert result.count('database "x"') == line.count('database "x"')


def test_a_placeholder_lookalike_cannot_pull_out_a_kept_name() -> None:
    # Each kept name stands in the text as one private-use character while the masks run; one in the
    # input must not be "restored" into a kept name, nor a quoted value hide behind it.
    result = redact("'\ue000 Ana' role \"migrator\" '\ue001'")
    assert result == f"'{MASK}' role \"migrator\" '{MASK}'"


def test_more_names_than_placeholders_are_still_safe() -> None:
    line = " ".join(f"database \"db{n}\" and 'Ana María'" for n in range(7000))
    result = redact(line)
    assert "Ana María" not in result
    assert not PRIVATE_USE.search(result)
    assert result.startswith("database \"db0\" and '***'")


def test_the_mask_is_three_stars() -> None:
    assert MASK == "***"
    assert redact("doc 1020304050") == "doc ***"


IDEMPOTENCE_CASES = (
    KEPT_VERBATIM
    + [line for line, _ in MIXED]
    + [line for line, _ in MASKED]
    + [line for line, _ in HOSTILE]
    + [
        " 1020304password authentication failed x",
        "10.0.0.7pbkdf2_sha256$1$a$b",
        "'it's' 'a",
        '""',
        "''",
        "user10.0.0.7a@b.coma@b.comvalue: entry column",
    ]
)


@pytest.mark.parametrize("line", IDEMPOTENCE_CASES)
def test_redaction_is_idempotent(line: str) -> None:
    once = redact(line)
    assert redact(once) == once


def test_redaction_is_idempotent_on_random_mixtures() -> None:
    atoms = [
        "database ", "user ", "server at ", "server on ", "host ", "table ", "column ", " for key ", "Key (", ")=(",
        "(", ")", "'", '"', "@", "://", "mysql://", "u:p@", "10.0.0.7", "1020304", "5432", ":", " ", "\n", "Can't",
        "Ana", "Gómez", ".", "password", "=", "password authentication failed", "(1049, ", "Unknown database ",
        "entry ", "value: ", "for type date: ", "Failing row contains", "[parameters: ", "]", "\ue000",
        "cannot reach ", ":22", " is not in known_hosts", "pbkdf2_sha256$1$a$b", "a@b.com", "+57 300 123 4567",
        MASK, "in 'field list'", "-----BEGIN RSA PRIVATE KEY-----", "%", "[", "::1", "socket ",
    ]  # fmt: skip
    rng = random.Random(20240601)
    for _ in range(3000):
        line = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 14)))
        once = redact(line)
        assert redact(once) == once, line
        assert not PRIVATE_USE.search(once), line


@pytest.mark.parametrize(
    "line",
    [
        "a" * 200_000,
        "Ab0+/" * 40_000,
        "a://" * 50_000,
        "x@" * 100_000,
        "entry 'x " * 20_000,
        "database \"x\" 10.0.0.1 'y' a@b.c " * 5_000,
    ],
    ids=["word", "base64", "schemes", "ats", "entries", "mixed"],
)
def test_long_lines_take_linear_time(line: str) -> None:
    start = time.perf_counter()
    redact(line)
    assert time.perf_counter() - start < 10
