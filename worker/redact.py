"""The redaction layer: every line that leaves a worker passes through :func:`redact`.

The worker itself only ever prints ids and counts; this catches what it does not control:
driver error messages (which quote offending values), tracebacks, connection strings.

Secrets and personal data are masked; the names a user needs to fix a misconfiguration are kept,
but only where drivers name them (``database "x"``, ``for user 'x'@'h'``, ``server at "h"``, the
host of a URL, ...) and only when they look like an identifier or a host. How:

1. characters of the Unicode private-use area are removed (the placeholders below use them, so
   an input cannot smuggle one in);
2. what is never kept is masked first: private keys, Django password hashes, ``Key (...)=(...)``,
   failing rows, ``[parameters: ...]``, MySQL's ``entry '...' for key``/``value: '...' for column``
   and PostgreSQL's ``for type ...: "..."`` values;
3. kept names, fixed driver phrases (``password authentication failed``, ``in 'field list'``)
   and structural quotes (the repr quotes of PyMySQL's ``(1049, "...")``, the apostrophe of
   ``can't``) are replaced by one placeholder each;
4. the masking patterns run over what is left: URL credentials, ``password=``, quoted values,
   e-mail addresses, phone- and document-like digit runs;
5. the placeholders are restored; and all of it again until nothing changes (idempotence).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

MASK = "***"

# -- 1. placeholders ---------------------------------------------------------------------------
_FIRST_PLACEHOLDER, _LAST_PLACEHOLDER = 0xE000, 0xF8FF
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
_MAX_PASSES = 8

# -- 2. never kept, masked before anything is kept --------------------------------------------
_NEVER_KEPT: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys, whole blocks.
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), MASK),
    # Django password hashes.
    # (argon2's hold commas: argon2$argon2id$v=19$m=102400,t=2,p=8$salt$hash)
    (re.compile(r"\b(pbkdf2_sha256|pbkdf2_sha1|argon2|bcrypt_sha256|bcrypt|scrypt|sha1|md5|crypt)\$[^\s'\")]+"), MASK),
    # PostgreSQL's "Key (col)=(value)" and "DETAIL: Failing row contains (…)".
    (re.compile(r"\)=\([^)]*\)"), f")=({MASK})"),
    (re.compile(r"(?i)(failing row contains\s*)\(.*"), rf"\1({MASK})"),
    # SQLAlchemy's "[parameters: …]" (engines hide them, this is the second line of defence).
    (re.compile(r"\[parameters: .*?\](?=\s|$)", re.S), f"[parameters: {MASK}]"),
    # MySQL: "Duplicate entry '…' for key 'k'", "Incorrect date value: '…' for column 'c'": the value
    # may hold quotes or line breaks, so it runs up to the quote before "for key|column" (MySQL
    # messages are at most 512 bytes).
    (
        re.compile(r"(?i)(\b(?:entry|value:)\s+)'[\s\S]{0,1000}?'(?=\s+for\s+(?:key|column)\b)"),
        rf"\1'{MASK}'",
    ),
    # PostgreSQL: 'invalid input syntax for type date: "…"', 'for enum sexo: "…"': up to the last
    # double quote of the line (the value may hold quotes itself).
    (re.compile(r"(?i)(\bfor\s+(?:type|enum)\b[^:\n\"']{0,80}:\s*)\"[^\n]*\""), rf'\1"{MASK}"'),
]

# -- 3. kept: names in driver positions, fixed phrases, structural quotes ---------------------
# What a kept name may look like: no spaces or quotes, bounded length.
_NAME_CHARS = r"[\w.\-:@%/\[\]]{1,128}"
_NAME = re.compile(_NAME_CHARS)
_LETTER = re.compile(r"[^\W\d_]")
_WILDCARD_HOST = re.compile(r"[\d.]*%[\d.%]*")  # MySQL's 'user'@'%', 'user'@'10.0.%'
_HOST_PORT = re.compile(r"\[(?P<b>[^\]]+)\](?::\d{1,5})?|(?P<h>[^:]+)(?::\d{1,5})?|(?P<v6>.*:.*)")

_Q = r"(?P<q>['\"])"  # an opening quote; the closing one is (?P=q)
_END = r"(?![\w'\"])"  # a kept quoted name is not glued to more text
_HOST = r"(?:\[[\w:.%]{1,64}\]|[\w\-]{1,63}(?:\.[\w\-]{1,63}){0,16})"
_UNQUOTED_HOST = rf"{_HOST}(?::\d{{1,5}})?(?![\w\-@])"

# Keywords after which drivers quote a name: libpq/PostgreSQL, PyMySQL/MariaDB, paramiko.
_KEYWORDS = (
    r"database|role|user|schema|relation|table|column|constraint|index|sequence|view|field|"
    r"for\s+key|key\s+name|host\s+name|host|server\s+at|server\s+on|server|socket"
)

# Fixed phrases: kept whole so that "password" in them is not taken for a password that follows.
_PHRASES = re.compile(
    r"(?i)\bpassword authentication failed\b|\bno password supplied\b|\busing password: (?:YES|NO)\b"
    r"|\bpassword retrieved from file\b"
    # MySQL's clause names: Unknown column 'x' in 'field list'.
    r"|\bin '(?:field list|where clause|on clause|order clause|group statement|having clause|IN/ALL/ANY subquery)'"
    # paramiko: Bad authentication type; allowed types: ['publickey', 'password']
    r"|\[(?:'(?:publickey|password|keyboard-interactive|hostbased|gssapi-with-mic|gssapi-keyex|none)'(?:,\s*)?)+\]"
)
# The apostrophe of "can't", "doesn't": not a quote, so it must not pair with one.
_CONTRACTION = re.compile(r"(?<=[A-Za-z]n)'(?=t\b)")
# PyMySQL's "(1049, \"Unknown database 'nope'\")": the repr quotes around a known driver message
# are structure, not a quoted value (anything else in "(1234, '…')" form stays a quoted value).
_MYSQL_TUPLE = re.compile(
    r"\((?P<code>\d{4}), (?P<q>['\"])(?P<msg>(?:Unknown database|Unknown table|Unknown column|Table '|"
    r"Access denied for user|Can't connect to|Unknown MySQL server host|Host '|Lost connection to|"
    r"MySQL server has gone away|Too many connections|Column '|Field '|Data too long for column|"
    r"Duplicate entry '|Incorrect \w+ value: '|Out of range value for column|Data truncated for column|"
    r"Cannot add or update a child row|Cannot delete or update a parent row|\w+ command denied to user)"
    r"[^\n]*)(?P=q)\)"
)
# A URL scheme, from the first letter of a run (tried once per run, not at every letter: linear time).
_SCHEME = r"(?<![A-Za-z0-9+.\-])(?P<pre>[0-9+.\-]*)(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)"
_URL = re.compile(
    rf"{_SCHEME}(?P<userinfo>(?:[^\s@]{{0,256}}@){{1,8}})?"
    rf"(?:(?P<host>{_HOST})(?![\w\-])"
    r"(?P<port>:\d{1,5}(?!\d))?(?P<db>/[A-Za-z_][\w$\-]{0,63}(?![\w$\-]))?)?"
)
_MYSQL_ACCOUNT = re.compile(rf"(?i)\buser\s+'(?P<user>{_NAME_CHARS})?'@'(?P<host>{_NAME_CHARS})'{_END}")
_SERVER_AT = re.compile(
    rf"(?i)\bserver\s+at\s+{_Q}(?P<host>{_NAME_CHARS})(?P=q){_END}"
    r"(?:\s+\((?P<ip>[0-9A-Fa-f:.%]{1,64})\))?(?:,\s+port\s+\d{1,5}(?!\d))?"
)
_QUOTED_NAME = re.compile(rf"(?i)\b(?:{_KEYWORDS})\s+{_Q}(?P<name>{_NAME_CHARS})(?P=q){_END}")
_UNQUOTED = re.compile(
    rf"(?i)\b(?:cannot reach|host key of|to port \d{{1,5}} on)\s+(?P<host>{_UNQUOTED_HOST})"
    rf"|(?<![\w.\-:\[\]@])(?P<known>{_HOST}:\d{{1,5}})(?= is not in known_hosts)"
    r"|\bauthentication as\s+(?P<user>[\w.\-]{1,64})(?![\w.\-@])"
)

# -- 4. masked --------------------------------------------------------------------------------
# (Anchored at the start of a run of address characters: the same matches, in linear time.)
_EMAIL = re.compile(r"(?<![^\s@'\"<>()])[^\s@'\"<>()]+@[^\s@'\"<>()]+\.[^\s@'\"<>()]+")
_CLOSING = {quote: re.compile(quote + r"(?!\w)") for quote in "'\""}
_BEFORE_QUOTES: list[tuple[re.Pattern[str], str]] = [
    # Credentials inside URLs: scheme://user:password@host → scheme://***@host (kept URLs are done).
    (re.compile(rf"{_SCHEME}[^/\s:@]+(:[^/\s@]*)?@"), rf"\g<pre>\g<scheme>{MASK}@"),
    # password=…, pwd: …, secret '…', token=…
    (
        re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)\b(\s*[=:]\s*|\s+)(\"[^\"]*\"|'[^']*'|\S+)"),
        rf"\1\2{MASK}",
    ),
]
# (then quoted values: _mask_quoted)
_AFTER_QUOTES: list[tuple[re.Pattern[str], str]] = [
    # E-mail addresses.
    (_EMAIL, f"{MASK}@{MASK}"),
    # Phone- and document-like runs: 7+ digits, possibly with separators, or a leading '+'.
    (re.compile(r"\+?\d[\d .-]{5,}\d"), MASK),
]


def _mask_quoted(text: str, quote: str) -> str:
    """Quoted values in driver messages: 'Ana María', "…", within a line.

    A quote followed by a letter does not close a value when a later quote on the line can
    ('O'Brien Ruiz', "a"b"); when none can, the next quote closes it, as a plain '[^']*' would.
    (A scan rather than one regex: the fallback would make a line of lone quotes quadratic.)"""
    closing = _CLOSING[quote]
    lines = text.split("\n")
    for n, line in enumerate(lines):
        if quote not in line:
            continue
        out: list[str] = []
        done, can_close = 0, True
        while (start := line.find(quote, done)) >= 0:
            close = closing.search(line, start + 1) if can_close else None
            if close is not None:
                end = close.end()
            else:
                can_close = False  # no closing quote from here to the end of the line
                end = line.find(quote, start + 1) + 1
                if end == 0:
                    break
            out += [line[done:start], quote, MASK, quote]
            done = end
        out.append(line[done:])
        lines[n] = "".join(out)
    return "\n".join(lines)


def _is_address(token: str) -> bool:
    """An IPv4/IPv6 address, possibly bracketed, with a zone or a port."""
    match = _HOST_PORT.fullmatch(token)
    if match is None:
        return False
    for candidate in (match["b"], match["h"], match["v6"], token):
        if candidate:
            try:
                ipaddress.ip_address(candidate.split("%", 1)[0])
            except ValueError:
                continue
            return True
    return False


def _keepable(token: str | None) -> bool:
    """Does ``token`` look like a name or a host (not like a value, an e-mail or a document)?"""
    if not token or not _NAME.fullmatch(token) or _EMAIL.search(token):
        return False
    return bool(_LETTER.search(token)) or _is_address(token) or bool(_WILDCARD_HOST.fullmatch(token))


class _Kept:
    """Kept pieces of text, each standing in the text as one private-use character."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def hold(self, piece: str) -> str:
        if _FIRST_PLACEHOLDER + len(self.pieces) > _LAST_PLACEHOLDER:
            return piece  # out of placeholders: the rest is masked as usual
        self.pieces.append(piece)
        return chr(_FIRST_PLACEHOLDER + len(self.pieces) - 1)

    def restore(self, text: str) -> str:
        return _PRIVATE_USE.sub(lambda m: self.pieces[ord(m[0]) - _FIRST_PLACEHOLDER], text)

    def sub(self, pattern: re.Pattern[str], text: str, keep: Callable[[re.Match[str]], bool] | None = None) -> str:
        """Hold every match of ``pattern`` (that ``keep`` accepts)."""
        return pattern.sub(lambda m: self.hold(m[0]) if keep is None or keep(m) else m[0], text)


def _keep(text: str, kept: _Kept) -> str:
    def url(m: re.Match[str]) -> str:
        credentials = f"{MASK}@" if m["userinfo"] is not None else ""
        if m["host"] is None:
            return m["pre"] + m["scheme"] + credentials
        where = m["host"] + (m["port"] or "") + (m["db"] or "")
        return m["pre"] + m["scheme"] + credentials + (kept.hold(where) if _keepable(m["host"].strip("[]")) else where)

    def mysql_tuple(m: re.Match[str]) -> str:
        quote = kept.hold(m["q"])
        return f"({m['code']}, {quote}{m['msg']}{kept.hold(m['q'])})"

    text = _MYSQL_TUPLE.sub(mysql_tuple, text)
    text = _URL.sub(url, text)
    text = kept.sub(_PHRASES, text)
    text = kept.sub(_CONTRACTION, text)
    text = kept.sub(
        _MYSQL_ACCOUNT, text, lambda m: (m["user"] is None or _keepable(m["user"])) and _keepable(m["host"])
    )
    text = kept.sub(_SERVER_AT, text, lambda m: _keepable(m["host"]) and (m["ip"] is None or _is_address(m["ip"])))
    text = kept.sub(_QUOTED_NAME, text, lambda m: _keepable(m["name"]))
    return kept.sub(_UNQUOTED, text, lambda m: _keepable(m["host"] or m["known"] or m["user"]))


def _redact_once(text: str) -> str:
    for pattern, replacement in _NEVER_KEPT:
        text = pattern.sub(replacement, text)
    kept = _Kept()
    text = _keep(text, kept)
    for pattern, replacement in _BEFORE_QUOTES:
        text = pattern.sub(replacement, text)
    text = _mask_quoted(_mask_quoted(text, "'"), '"')
    for pattern, replacement in _AFTER_QUOTES:
        text = pattern.sub(replacement, text)
    return kept.restore(text)


def redact(text: str) -> str:
    """Mask secrets and anything that looks like personal data in ``text``; keep the names of
    databases, users, hosts, ports and relations where drivers name them.

    Idempotent: a mask can uncover a match (``1020304password x``: ``***password x``), so the
    passes repeat until nothing changes; text that does not settle is masked whole."""
    text = _PRIVATE_USE.sub("", text)
    for _ in range(_MAX_PASSES):
        redacted = _redact_once(text)
        if redacted == text:
            return text
        text = redacted
    return MASK
