"""A real SMTP server for the alert tests: aiosmtpd on loopback, requiring a login (the fixture
``smtp_server`` in conftest.py starts one per test)."""

import email as email_lib
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

SMTP_USER, SMTP_PASSWORD = "alerts", "sm7p-pa55"


@dataclass
class Mailbox:
    """A real SMTP server (aiosmtpd) on loopback that requires a login."""

    port: int
    password: str = SMTP_PASSWORD
    messages: list[EmailMessage] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://{SMTP_USER}:{self.password}@127.0.0.1:{self.port}"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.raw.append(envelope.content)
        self.messages.append(email_lib.message_from_bytes(envelope.content, policy=default_policy))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 235/535


def start_mailbox(mailbox: Mailbox) -> Controller:
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=mailbox.port, authenticator=mailbox.authenticate, auth_require_tls=False
    )
    controller.start()
    return controller
