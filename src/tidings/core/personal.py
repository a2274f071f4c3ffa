"""Personal data in permanent events: encrypted per data subject, so it can be forgotten.

```python
class CustomerRegistered(Event, type="customer.registered"):
    customer_id: str
    email: Annotated[str, Personal(subject="customer_id")]
```

When such an event is appended, each personal field is stored encrypted (AES-256-GCM) with
a key of its data subject (the value of the `subject` field), kept in the store; the rest of
the event stays readable. Reading decrypts it again. `await store.forget("c-1")` deletes the
subject's key: from then on every read path (reads, subscriptions, projections and their
rebuilds, aggregates, consumers, the CLI) shows the field as `REDACTED`, while the event and
its place in the log stay. Keys never leave the store: a typed event published to a broker
carries its personal fields redacted, and a relay that copies stored events without their
classes carries them as stored, encrypted.

A stored personal value is the text `tidings:pii:v1:<subject>:<nonce+ciphertext>` (both
base64url), bound to its subject and field name, so decrypting never needs the class.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tidings.core.errors import ConfigurationError

__all__ = [
    "PREFIX",
    "REDACTED",
    "Personal",
    "decrypt_fields",
    "encrypt",
    "new_key",
    "subjects_in",
]

PREFIX = "tidings:pii:v1:"
REDACTED = "[redacted]"
"""What a personal field reads as once its subject has been forgotten (or without the key)."""
_ENVELOPE = re.compile(r"tidings:pii:v1:([A-Za-z0-9_-]*=*):")


@dataclass(frozen=True, slots=True)
class Personal:
    """Marks a `str` field as personal data of the subject named by another field."""

    subject: str


def new_key() -> bytes:
    """A fresh 256-bit key for one data subject."""
    return os.urandom(32)


def _aead(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:  # pragma: no cover - the extra is missing
        raise ConfigurationError(
            'personal fields need the cryptography package: pip install "tidings[personal]"'
        ) from None
    return AESGCM(key)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


def encrypt(key: bytes, subject: str, field: str, value: str) -> str:
    """The stored form of one personal value."""
    nonce = os.urandom(12)
    sealed = _aead(key).encrypt(nonce, value.encode(), f"{subject}\x00{field}".encode())
    return f"{PREFIX}{_b64(subject.encode())}:{_b64(nonce + sealed)}"


def _open(key: bytes | None, subject: str, field: str, token: str) -> str:
    if key is None:
        return REDACTED
    raw = base64.urlsafe_b64decode(token)
    try:
        opened: bytes = _aead(key).decrypt(raw[:12], raw[12:], f"{subject}\x00{field}".encode())
    except Exception:  # a damaged value, or a key that is not its subject's
        return REDACTED
    return opened.decode()


def subjects_in(text: str) -> set[str]:
    """The data subjects whose encrypted values appear in stored JSON `text`."""
    return {base64.urlsafe_b64decode(s).decode() for s in _ENVELOPE.findall(text)}


def decrypt_fields(
    data: dict[str, Any], keys: Mapping[str, bytes], fields: Mapping[str, str]
) -> dict[str, Any]:
    """`data` with each sealed personal value opened, or `REDACTED` where the subject's key
    is gone. Only `fields` (personal field -> subject field) are looked at, and only a value
    sealed for the subject the event names: any other text is data, left as it is."""
    for field, subject_field in fields.items():
        value = data.get(field)
        if not isinstance(value, str) or not value.startswith(PREFIX):
            continue
        subject = str(data.get(subject_field))
        head = f"{PREFIX}{_b64(subject.encode())}:"
        if value.startswith(head):
            data[field] = _open(keys.get(subject), subject, field, value[len(head) :])
    return data
