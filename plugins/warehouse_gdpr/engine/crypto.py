"""Keys, keyed hashes and the archive cipher.

Secrets come from an Airflow connection (default conn id ``gdpr_keys``), so any secrets backend
works. Its ``extra`` JSON holds::

    {
      "hmac_key_id": "pepper-1",
      "hmac_pepper": "<base64, at least 32 bytes>",
      "archive_key_id": "archive-2026",
      "archive_keys": {"archive-2026": "<base64, exactly 32 bytes>", "archive-2025": "..."}
    }

``archive_key_id`` is the key new archive rows are encrypted with; older keys stay listed so that
rows encrypted before a rotation still decrypt. Nothing here ever logs or returns a key.

Rotating the pepper (see `optout` for the trade-off): the new pepper becomes ``hmac_key_id`` /
``hmac_pepper`` and every earlier one moves, oldest first, to ``hmac_chain``::

      "hmac_key_id": "pepper-2", "hmac_pepper": "<new>",
      "hmac_chain": [{"key_id": "pepper-1", "pepper": "<old>"}]

A person's hash is then chained: HMAC(pepper-2, HMAC(pepper-1, email)) (hex in between), so hashes
stored under pepper-1 are re-keyed without the plaintext. Earlier peppers must stay listed forever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError

MIN_PEPPER_BYTES = 32
ARCHIVE_KEY_BYTES = 32  # AES-256


class KeyConfigError(ConfigurationError, ValueError):
    """The key material is missing or unusable. The message names the field, never a value."""


def _b64(value: object, what: str, conn_id: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise KeyConfigError(f"connection {conn_id!r}: {what} is missing from the connection extra")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyConfigError(f"connection {conn_id!r}: {what} is not valid base64") from None


@dataclass(frozen=True, repr=False)
class Keys:
    """Key material for one run. `repr` shows key ids only."""

    hmac_key_id: str
    pepper: bytes
    archive_key_id: str
    archive_keys: Mapping[str, bytes] = field(default_factory=dict)
    # Peppers used before the current one, oldest first: (key id, pepper). See `subject_hash`.
    hmac_chain: tuple[tuple[str, bytes], ...] = ()

    def __repr__(self) -> str:
        chain = f", hmac_chain={[k for k, _ in self.hmac_chain]!r}" if self.hmac_chain else ""
        return (f"Keys(hmac_key_id={self.hmac_key_id!r}{chain}, archive_key_id={self.archive_key_id!r}, "
                f"archive_key_ids={sorted(self.archive_keys)!r})")

    @classmethod
    def from_extra(cls, extra: Mapping[str, object], conn_id: str = "gdpr_keys") -> Keys:
        """Build keys from a connection's extra dict; raise KeyConfigError naming what is wrong."""
        hmac_key_id = extra.get("hmac_key_id")
        if not isinstance(hmac_key_id, str) or not hmac_key_id:
            raise KeyConfigError(f"connection {conn_id!r}: hmac_key_id is missing from the connection extra")
        pepper = _b64(extra.get("hmac_pepper"), "hmac_pepper", conn_id)
        if len(pepper) < MIN_PEPPER_BYTES:
            raise KeyConfigError(
                f"connection {conn_id!r}: hmac_pepper is {len(pepper)} bytes, at least {MIN_PEPPER_BYTES} are required"
            )
        raw_keys = extra.get("archive_keys")
        if not isinstance(raw_keys, Mapping) or not raw_keys:
            raise KeyConfigError(f"connection {conn_id!r}: archive_keys (key id -> base64 key) is missing")
        archive_keys: dict[str, bytes] = {}
        for key_id, value in raw_keys.items():
            key = _b64(value, f"archive_keys[{key_id!r}]", conn_id)
            if len(key) != ARCHIVE_KEY_BYTES:
                raise KeyConfigError(
                    f"connection {conn_id!r}: archive_keys[{key_id!r}] is {len(key)} bytes, AES-256 needs exactly 32"
                )
            archive_keys[str(key_id)] = key
        active = extra.get("archive_key_id")
        if not isinstance(active, str) or active not in archive_keys:
            raise KeyConfigError(f"connection {conn_id!r}: archive_key_id must name one of archive_keys")
        return cls(hmac_key_id=hmac_key_id, pepper=pepper, archive_key_id=active, archive_keys=archive_keys,
                   hmac_chain=_chain(extra.get("hmac_chain"), hmac_key_id, conn_id))

    # -- keyed hashes -------------------------------------------------------------------------
    def hash_value(self, value: str) -> str:
        """HMAC-SHA256 of a value, hex. Stable for the same pepper: a pseudonym that stays joinable."""
        return hmac.new(self.pepper, value.encode("utf-8"), hashlib.sha256).hexdigest()

    def subject_hash(self, email: str, strip_plus_tags: bool = False) -> str:
        """Keyed hash of a normalised email: how logs, audit rows and lists refer to a person.

        With one pepper: HMAC-SHA256(pepper, normalised email), hex. After rotations, the chain:
        HMAC(current, ... HMAC(second, HMAC(first, normalised email)) ...).
        """
        return self.subject_hashes(email, strip_plus_tags)[self.hmac_key_id]

    @property
    def hmac_key_ids(self) -> list[str]:
        """Every pepper's key id, oldest first; the last is the current one."""
        return [key_id for key_id, _ in self.hmac_chain] + [self.hmac_key_id]

    def _peppers(self) -> list[tuple[str, bytes]]:
        return [*self.hmac_chain, (self.hmac_key_id, self.pepper)]

    def subject_hashes(self, email: str, strip_plus_tags: bool = False) -> dict[str, str]:
        """{key id: the person's hash as it was when that key was current}, oldest first.

        The last one is `subject_hash`; the others find rows written before a rotation (audit rows,
        list entries not re-keyed yet).
        """
        return dict(zip(self.hmac_key_ids, self.hasher(strip_plus_tags)(email), strict=True))

    def hasher(self, strip_plus_tags: bool = False) -> Callable[[str], list[str]]:
        """A fast `subject_hashes` for bulk work: email -> [hash under each key id, oldest first]."""
        prepared = [hmac.new(pepper, digestmod=hashlib.sha256) for _, pepper in self._peppers()]

        def hashes(email: str) -> list[str]:
            value = normalise_email(email, strip_plus_tags)
            out = []
            for base in prepared:
                mac = base.copy()
                mac.update(value.encode("utf-8"))
                value = mac.hexdigest()
                out.append(value)
            return out

        return hashes

    def unchained_hashes(self, value: str) -> list[str]:
        """HMAC-SHA256 of `value` under each pepper on its own, oldest first: what `hash_value` gave while
        that pepper was current (hashed columns written before they hashed the normalised email)."""
        return [hmac.new(pepper, value.encode("utf-8"), hashlib.sha256).hexdigest() for _, pepper in self._peppers()]

    def rekey(self, stored_hash: str, key_id: str) -> str:
        """A hash stored under `key_id`, brought to the current key (chaining; no plaintext needed)."""
        ids = self.hmac_key_ids
        if key_id not in ids:
            raise KeyConfigError(f"hmac key {key_id!r} is not in the keys connection (hmac_key_id or hmac_chain)")
        value = stored_hash
        for _, pepper in self._peppers()[ids.index(key_id) + 1:]:
            value = hmac.new(pepper, value.encode("utf-8"), hashlib.sha256).hexdigest()
        return value

    # -- archive cipher -----------------------------------------------------------------------
    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        """AES-256-GCM with the active key. Returns (key_id, nonce, ciphertext)."""
        nonce = os.urandom(12)
        cipher = AESGCM(self.archive_keys[self.archive_key_id])
        return self.archive_key_id, nonce, cipher.encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt an archive row; raises KeyConfigError if the key id is unknown, InvalidTag if tampered."""
        key = self.archive_keys.get(key_id)
        if key is None:
            raise KeyConfigError(f"archive key {key_id!r} is not in the keys connection")
        return AESGCM(key).decrypt(nonce, ciphertext, aad)


def normalise_email(email: str, strip_plus_tags: bool = False) -> str:
    """Trim, Unicode NFKC, lowercase: every spelling of one address gets one hash.

    With `strip_plus_tags` (policy `optout.strip_plus_tags`), a sub-address tag is dropped too:
    ``john+news@example.com`` -> ``john@example.com`` (a local part made only of a tag is kept).
    """
    email = unicodedata.normalize("NFKC", email).strip().lower()
    if strip_plus_tags:
        local, at, domain = email.rpartition("@")
        tagless = local.split("+", 1)[0]
        if at and tagless:
            email = f"{tagless}@{domain}"
    return email


def _chain(value: object, current: str, conn_id: str) -> tuple[tuple[str, bytes], ...]:
    """The retired peppers of `hmac_chain` (a list of {key_id, pepper}, oldest first), checked."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise KeyConfigError(f"connection {conn_id!r}: hmac_chain must be a list of {{key_id, pepper}}, oldest first")
    chain: list[tuple[str, bytes]] = []
    for i, item in enumerate(value):
        key_id = item.get("key_id") if isinstance(item, Mapping) else None
        if not isinstance(key_id, str) or not key_id:
            raise KeyConfigError(f"connection {conn_id!r}: hmac_chain[{i}].key_id is missing")
        if key_id == current or key_id in (k for k, _ in chain):
            raise KeyConfigError(
                f"connection {conn_id!r}: hmac key id {key_id!r} appears twice (hmac_chain, hmac_key_id)")
        pepper = _b64(item.get("pepper"), f"hmac_chain[{i}].pepper", conn_id)
        if len(pepper) < MIN_PEPPER_BYTES:
            raise KeyConfigError(
                f"connection {conn_id!r}: hmac_chain[{i}].pepper is {len(pepper)} bytes, at least "
                f"{MIN_PEPPER_BYTES} are required"
            )
        chain.append((key_id, pepper))
    return tuple(chain)


def archive_aad(source_table: str, source_pk: str, key_id: str) -> bytes:
    """Associated data binding a ciphertext to its row, so it cannot be replayed onto another."""
    return f"{source_table}|{source_pk}|{key_id}".encode()


def generate_extra() -> dict[str, object]:
    """Fresh random key material, in the connection-extra format (used by the demo and tests)."""
    return {
        "hmac_key_id": "pepper-1",
        "hmac_pepper": base64.b64encode(os.urandom(32)).decode(),
        "archive_key_id": "archive-1",
        "archive_keys": {"archive-1": base64.b64encode(os.urandom(32)).decode()},
    }


def main() -> None:
    """``python -m warehouse_gdpr.crypto``: print fresh keys as one line of connection-extra JSON (no spaces,
    so it fits an env file), e.g. for the compose stack's ``GDPR_KEYS_EXTRA``. Store it in your secrets backend."""
    import json

    print(json.dumps(generate_extra(), separators=(",", ":")))


if __name__ == "__main__":
    main()
