"""The redaction layer: every line that leaves a worker passes through :func:`redact`.

The worker itself only ever prints ids and counts; this catches what it does not control:
driver error messages (which quote offending values), tracebacks, connection strings.
"""

from __future__ import annotations

import re

MASK = "***"
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys, whole blocks.
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), MASK),
    # Credentials inside URLs: scheme://user:password@host → scheme://***@host
    (re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@"), rf"\1{MASK}@"),
    # password=…, pwd: …, secret '…', token=…
    (
        re.compile(r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key)\b(\s*[=:]\s*|\s+)(\"[^\"]*\"|'[^']*'|\S+)"),
        rf"\1\2{MASK}",
    ),
    # Django password hashes.
    (re.compile(r"\b(pbkdf2_sha256|pbkdf2_sha1|argon2|bcrypt_sha256|bcrypt|scrypt|sha1|md5|crypt)\$[^\s'\",)]+"), MASK),
    # PostgreSQL's "Key (col)=(value)" and "DETAIL: Failing row contains (…)".
    (re.compile(r"\)=\([^)]*\)"), f")=({MASK})"),
    (re.compile(r"(?i)(failing row contains\s*)\(.*"), rf"\1({MASK})"),
    # SQLAlchemy's "[parameters: …]" (engines hide them, this is the second line of defence).
    (re.compile(r"\[parameters: .*?\](?=\s|$)", re.S), f"[parameters: {MASK}]"),
    # Quoted values in driver messages: 'Ana María', "…".
    (re.compile(r"'[^'\n]*'"), f"'{MASK}'"),
    (re.compile(r'"[^"\n]*"'), f'"{MASK}"'),
    # E-mail addresses.
    (re.compile(r"[^\s@'\"<>()]+@[^\s@'\"<>()]+\.[^\s@'\"<>()]+"), f"{MASK}@{MASK}"),
    # Phone- and document-like runs: 7+ digits, possibly with separators, or a leading '+'.
    (re.compile(r"\+?\d[\d .-]{5,}\d"), MASK),
]


def redact(text: str) -> str:
    """Mask secrets and anything that looks like personal data in ``text``."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
