"""Encryption of the personal columns for a store that cannot encrypt itself (PostgreSQL).

A database server sees every value it holds, so the postgres backend seals each record's
personal fields in keygate before they leave the process, and finds records by a keyed blind
index instead of by their ids:

- **Data keys** (random 256-bit AES-GCM keys, numbered by a key id) seal the values: a fresh
  96-bit nonce per value, the record's table and blind index as associated data (a sealed value
  copied onto another record does not open), the key id stored beside the value.
- **The index key** (random, never rotated: every index would change) makes the blind indexes:
  HMAC-SHA-256 of a table's label and the id.
- **The key ring** (the data keys, the index key and which data key is current) is itself sealed
  under a key-encryption key stretched with scrypt from ``store.key`` and the database's own
  random salt. Changing ``store.key`` re-seals the ring; rotating the data key re-seals rows one
  batch at a time while the gateways go on (``keygate store rekey``, ownership/pg_store.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ownership.store import StoreError

_KEK_LABEL = b"keygate/ownership-store/pg-kek/v1/"
_RING_AAD = b"keygate/ownership-store/key-ring/v1"
NONCE_BYTES = 12


class SealError(StoreError):
    """A sealed value that does not open: the wrong key, another record's value, or tampering."""


def derive_kek(passphrase: str, salt: bytes) -> bytes:
    """The key-encryption key for ``store.key`` and a database's salt (the same cost as SQLCipher's)."""
    return hashlib.scrypt(passphrase.encode("utf-8", "surrogatepass"), salt=_KEK_LABEL + salt,
                          n=2 ** 14, r=8, p=1, dklen=32)


def kek_id(kek: bytes) -> str:
    """A name for a key-encryption key that reveals nothing of it (which ring a key opens)."""
    return hmac.new(kek, b"kek-id", hashlib.sha256).hexdigest()[:16]


@dataclass
class KeyRing:
    index_key: bytes
    data_keys: dict[int, bytes] = field(default_factory=dict)
    current: int = 1

    @classmethod
    def new(cls) -> KeyRing:
        return cls(index_key=secrets.token_bytes(32), data_keys={1: secrets.token_bytes(32)}, current=1)

    def with_new_data_key(self) -> KeyRing:
        kid = max(self.data_keys) + 1
        return KeyRing(self.index_key, {**self.data_keys, kid: secrets.token_bytes(32)}, kid)

    def without_keys_but(self, keep: set[int]) -> KeyRing:
        return KeyRing(self.index_key, {k: v for k, v in self.data_keys.items() if k in keep}, self.current)

    # ------------------------------------------------------------------ the ring, sealed under a KEK

    def seal_under(self, kek: bytes) -> bytes:
        body = json.dumps({"index": self.index_key.hex(), "current": self.current,
                           "data": {str(k): v.hex() for k, v in self.data_keys.items()}}).encode()
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(kek).encrypt(nonce, body, _RING_AAD)

    @classmethod
    def open_with(cls, kek: bytes, blob: bytes) -> KeyRing:
        try:
            body = json.loads(AESGCM(kek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _RING_AAD))
        except (InvalidTag, ValueError):
            raise SealError("the key ring does not open with this key") from None
        return cls(bytes.fromhex(body["index"]), {int(k): bytes.fromhex(v) for k, v in body["data"].items()},
                   int(body["current"]))

    # ------------------------------------------------------------------ values

    def index(self, table: str, *parts: str) -> bytes:
        """The blind index of a record's id (``parts`` joined unambiguously) within ``table``."""
        msg = "\x00".join((table, *parts)).encode("utf-8", "surrogatepass")
        return hmac.new(self.index_key, msg, hashlib.sha256).digest()

    def seal(self, table: str, bidx: bytes, value: Any) -> tuple[int, bytes]:
        """(key id, nonce + ciphertext) of a JSON-able value bound to its record."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        body = json.dumps(value, separators=(",", ":")).encode()
        return self.current, nonce + AESGCM(self.data_keys[self.current]).encrypt(nonce, body, _aad(table, bidx))

    def open(self, table: str, bidx: bytes, kid: int, blob: bytes) -> Any:
        key = self.data_keys.get(kid)
        if key is None:
            raise SealError(f"{table}: value sealed under data key {kid}, which this key ring does not hold")
        try:
            return json.loads(AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(table, bidx)))
        except InvalidTag:
            raise SealError(f"{table}: a sealed value does not open (tampered, or moved from another record)"
                            ) from None


def _aad(table: str, bidx: bytes) -> bytes:
    return table.encode() + b"\x00" + bidx
