"""Keys, keyed hashes and the archive cipher.

Secrets come from Airflow connections, so any secrets backend works. The keys connection (default conn
id ``gdpr_keys``), which every task of the deployment reads, holds in its ``extra`` JSON::

    {
      "hmac_key_id": "pepper-1",
      "hmac_pepper": "<base64, at least 32 bytes>",
      "store_key_id": "store-1",
      "store_keys": {"store-1": "<base64, exactly 32 bytes>"},
      "archive_key_id": "archive-x1",
      "archive_public_keys": {"archive-x1": "<base64, a raw 32-byte X25519 public key>"}
    }

The archive (``gdpr_archive.archived_row``, and the access packages) is encrypted to a public key:
``archive_key_id`` names the key new archive rows are encrypted with, an X25519 public key of
``archive_public_keys`` (hybrid encryption: an ephemeral X25519 key per batch, ECDH, HKDF-SHA256 -> an
AES-256-GCM key, a fresh nonce per row; the ephemeral public key is stored in front of each row's
ciphertext). Writing the archive needs only the public key; reading it needs the private key, which
lives in a separate connection (default conn id ``gdpr_archive_private``) that only the legal /
accounting side, the access request and the archive-reading CLI load (`Keys.with_private`)::

    {"archive_private_keys": {"archive-x1": "<base64, raw 32-byte X25519 private key>"},
     "archive_keys": {"archive-1": "<base64, a former symmetric archive key, moved here>"}}

``store_keys`` are AES-256-GCM keys for what the engine encrypts for itself and reads back (a
registered request's identifier, the outbox's addresses, a rectification's new values):
``store_key_id`` is the one new records use; keep older ones listed while records under them remain.

The earlier layout, one symmetric key for everything (``archive_key_id`` naming one of
``archive_keys``, base64 32-byte AES keys), still loads: the store key is then the archive key. Rows
encrypted under any key id stay readable as long as that key id stays listed (symmetric keys in either
connection, public keys with their private key in the private connection). Key ids are unique across
all kinds. Nothing here ever logs or returns a key.

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
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigurationError

MIN_PEPPER_BYTES = 32
ARCHIVE_KEY_BYTES = 32  # AES-256
X25519_KEY_BYTES = 32
PRIVATE_CONNECTION_ID = "gdpr_archive_private"
DERIVED_CACHE = 4096  # hybrid keys kept while decrypting (one per archived batch)


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
    """Key material for one run. `repr` shows key ids only.

    `archive_keys` are every symmetric (AES-256-GCM) key by id: the store keys and the former archive keys
    of the earlier layout. `archive_public_keys` are the X25519 public keys the archive is encrypted to;
    `archive_private_keys` their private keys, present only once `with_private` loaded them."""

    hmac_key_id: str
    pepper: bytes
    archive_key_id: str
    archive_keys: Mapping[str, bytes] = field(default_factory=dict)
    # Peppers used before the current one, oldest first: (key id, pepper). See `subject_hash`.
    hmac_chain: tuple[tuple[str, bytes], ...] = ()
    # The symmetric key the engine encrypts its own records with (`encrypt`); "" = `archive_key_id`.
    store_key_id: str = ""
    archive_public_keys: Mapping[str, bytes] = field(default_factory=dict)
    archive_private_keys: Mapping[str, bytes] = field(default_factory=dict)
    # The connection the private keys come from: named by the error when one is needed but absent.
    private_connection_id: str = PRIVATE_CONNECTION_ID
    private_loaded: bool = False
    # Derived AES keys of hybrid rows, by (key id, ephemeral public key): one ECDH per batch, not per row.
    # Not an init field: a copy (`replace`, `with_private`) starts with an empty cache of its own.
    _derived: dict[tuple[str, bytes], AESGCM] = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.store_key_id:
            object.__setattr__(self, "store_key_id", self.archive_key_id)

    def __repr__(self) -> str:
        chain = f", hmac_chain={[k for k, _ in self.hmac_chain]!r}" if self.hmac_chain else ""
        store = f", store_key_id={self.store_key_id!r}" if self.store_key_id != self.archive_key_id else ""
        public = (f", archive_public_key_ids={sorted(self.archive_public_keys)!r}"
                  if self.archive_public_keys else "")
        private = (f", archive_private_key_ids={sorted(self.archive_private_keys)!r}"
                   if self.archive_private_keys else "")
        return (f"Keys(hmac_key_id={self.hmac_key_id!r}{chain}, archive_key_id={self.archive_key_id!r}, "
                f"archive_key_ids={sorted(self.archive_keys)!r}{store}{public}{private})")

    @classmethod
    def from_extra(cls, extra: Mapping[str, object], conn_id: str = "gdpr_keys",
                   private_connection_id: str = PRIVATE_CONNECTION_ID) -> Keys:
        """Build keys from the keys connection's extra dict; raise KeyConfigError naming what is wrong."""
        hmac_key_id = extra.get("hmac_key_id")
        if not isinstance(hmac_key_id, str) or not hmac_key_id:
            raise KeyConfigError(f"connection {conn_id!r}: hmac_key_id is missing from the connection extra")
        pepper = _b64(extra.get("hmac_pepper"), "hmac_pepper", conn_id)
        if len(pepper) < MIN_PEPPER_BYTES:
            raise KeyConfigError(
                f"connection {conn_id!r}: hmac_pepper is {len(pepper)} bytes, at least {MIN_PEPPER_BYTES} are required"
            )
        archive_keys = _key_map(extra, "archive_keys", conn_id)
        store_keys = _key_map(extra, "store_keys", conn_id)
        public_keys = _key_map(extra, "archive_public_keys", conn_id)
        if not archive_keys and not public_keys:
            raise KeyConfigError(f"connection {conn_id!r}: archive_keys (key id -> base64 key) is missing")
        symmetric = _merge(archive_keys, store_keys, "store_keys", conn_id)
        for key_id in public_keys:
            if key_id in symmetric:
                raise KeyConfigError(f"connection {conn_id!r}: key id {key_id!r} appears twice "
                                     "(archive_public_keys and archive_keys or store_keys)")
        active = extra.get("archive_key_id")
        if not isinstance(active, str) or (active not in archive_keys and active not in public_keys):
            where = "archive_keys or archive_public_keys" if public_keys else "archive_keys"
            raise KeyConfigError(f"connection {conn_id!r}: archive_key_id must name one of {where}")
        store = extra.get("store_key_id")
        if store is None and active in symmetric:
            store = active  # the earlier layout: one symmetric key for the archive and the engine's records
        if not isinstance(store, str) or store not in symmetric:
            raise KeyConfigError(
                f"connection {conn_id!r}: store_key_id must name one of store_keys (a symmetric key: the engine "
                "reads back what it stores with it), required when archive_key_id names a public key")
        return cls(hmac_key_id=hmac_key_id, pepper=pepper, archive_key_id=active, archive_keys=symmetric,
                   hmac_chain=_chain(extra.get("hmac_chain"), hmac_key_id, conn_id), store_key_id=store,
                   archive_public_keys=public_keys, private_connection_id=private_connection_id)

    def with_private(self, extra: Mapping[str, object] | None, conn_id: str | None = None) -> Keys:
        """These keys plus the archive's private connection's: its X25519 private keys (each checked against
        the public key of the same id, when the keys connection lists it) and the former symmetric archive
        keys moved there. `extra` None: the connection is not defined (decrypting a hybrid row then fails
        naming it)."""
        conn_id = conn_id or self.private_connection_id
        if extra is None:
            return replace(self, private_connection_id=conn_id, private_loaded=False)
        private_raw = _key_map(extra, "archive_private_keys", conn_id)
        moved = _key_map(extra, "archive_keys", conn_id)
        public = dict(self.archive_public_keys)
        for key_id, raw in private_raw.items():
            if key_id in self.archive_keys or key_id in moved:
                raise KeyConfigError(f"connection {conn_id!r}: key id {key_id!r} appears twice "
                                     "(archive_private_keys and a symmetric key)")
            derived = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
            if public.setdefault(key_id, derived) != derived:
                raise KeyConfigError(
                    f"connection {conn_id!r}: archive_private_keys[{key_id!r}] is not the private key of "
                    f"archive_public_keys[{key_id!r}] in the keys connection")
        for key_id, key in moved.items():
            if key_id in public:
                raise KeyConfigError(f"connection {conn_id!r}: key id {key_id!r} appears twice "
                                     "(archive_keys and an X25519 key)")
            if self.archive_keys.get(key_id, key) != key:
                raise KeyConfigError(f"connection {conn_id!r}: archive_keys[{key_id!r}] differs from the key "
                                     "of the same id in the keys connection")
        return replace(self, archive_keys={**self.archive_keys, **moved}, archive_public_keys=public,
                       archive_private_keys=private_raw, private_connection_id=conn_id, private_loaded=True)

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

    # -- ciphers ------------------------------------------------------------------------------
    def encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        """AES-256-GCM with the store key (`store_key_id`): what the engine encrypts for itself and reads back
        (a registered request's identifier, the outbox's addresses, a rectification's new values). Returns
        (key_id, nonce, ciphertext); compute `aad` with `store_key_id`."""
        nonce = os.urandom(12)
        cipher = AESGCM(self.archive_keys[self.store_key_id])
        return self.store_key_id, nonce, cipher.encrypt(nonce, plaintext, aad)

    @property
    def archive_is_hybrid(self) -> bool:
        """Whether new archive rows are encrypted to a public key (reading them needs the private connection)."""
        return self.archive_key_id in self.archive_public_keys

    def archive_sealer(self) -> ArchiveSealer:
        """The cipher of new archive rows (the archive, the access packages), under `archive_key_id`: a hybrid
        one (one ephemeral X25519 key for the sealer's life, so take one per batch) or, in the earlier layout,
        AES-256-GCM with the symmetric archive key. Needs no private key."""
        return ArchiveSealer(self.archive_key_id, self.archive_public_keys.get(self.archive_key_id),
                             self.archive_keys.get(self.archive_key_id))

    def archive_encrypt(self, plaintext: bytes, aad: bytes) -> tuple[str, bytes, bytes]:
        """One archive value under `archive_key_id` (compute `aad` with it): (key_id, nonce, ciphertext)."""
        sealer = self.archive_sealer()
        return (sealer.key_id, *sealer.seal(plaintext, aad))

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt a value encrypted under `key_id` (a symmetric key, or an X25519 one: the ephemeral public
        key in front of the ciphertext). Raises KeyConfigError if the key id is unknown or its private key
        was not loaded (naming the connection, never a key), InvalidTag if altered or under another key."""
        key = self.archive_keys.get(key_id)
        if key is not None:
            return AESGCM(key).decrypt(nonce, ciphertext, aad)
        if key_id not in self.archive_public_keys:
            if self.private_loaded:
                raise KeyConfigError(f"archive key {key_id!r} is not in the keys connection nor in the archive's "
                                     f"private connection {self.private_connection_id!r}")
            raise KeyConfigError(f"archive key {key_id!r} is not in the keys connection")
        private = self.archive_private_keys.get(key_id)
        if private is None:
            if self.private_loaded:
                raise KeyConfigError(
                    f"archive key {key_id!r} is a public key: its private key is not in the archive's private "
                    f"connection {self.private_connection_id!r} (archive_private_keys)")
            raise KeyConfigError(
                f"archive key {key_id!r} is a public key: decrypting needs its private key, from the connection "
                f"{self.private_connection_id!r}, which this task did not load (only the access request and "
                "the archive-reading commands do) or which is not defined")
        ephemeral, body = bytes(ciphertext[:X25519_KEY_BYTES]), ciphertext[X25519_KEY_BYTES:]
        if len(ephemeral) != X25519_KEY_BYTES:
            raise InvalidTag
        cipher = self._derived.get((key_id, ephemeral))
        if cipher is None:
            recipient = self.archive_public_keys[key_id]
            try:
                shared = X25519PrivateKey.from_private_bytes(private).exchange(
                    X25519PublicKey.from_public_bytes(ephemeral))
            except ValueError:  # an altered ephemeral key of low order: no shared secret
                raise InvalidTag from None
            cipher = AESGCM(_hybrid_key(shared, key_id, ephemeral, recipient))
            if len(self._derived) >= DERIVED_CACHE:
                self._derived.clear()
            self._derived[(key_id, ephemeral)] = cipher
        return cipher.decrypt(nonce, body, aad)


class ArchiveSealer:
    """Encrypts archive values under one key id (`Keys.archive_sealer`). Hybrid: one ephemeral X25519 key,
    one ECDH and HKDF for the sealer's life, a fresh 12-byte nonce per value; the ciphertext is the ephemeral
    public key (32 bytes) followed by the AES-256-GCM ciphertext. `repr` shows the key id only."""

    def __init__(self, key_id: str, public_key: bytes | None, symmetric_key: bytes | None) -> None:
        self.key_id = key_id
        if public_key is not None:
            ephemeral = X25519PrivateKey.generate()
            self._prefix = ephemeral.public_key().public_bytes_raw()
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public_key))
            self._cipher = AESGCM(_hybrid_key(shared, key_id, self._prefix, public_key))
        else:
            assert symmetric_key is not None
            self._prefix = b""
            self._cipher = AESGCM(symmetric_key)

    def __repr__(self) -> str:
        return f"ArchiveSealer(key_id={self.key_id!r})"

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext) of one value; `aad` binds it to its place (see `archive_aad`)."""
        nonce = os.urandom(12)
        return nonce, self._prefix + self._cipher.encrypt(nonce, plaintext, aad)


def _hybrid_key(shared: bytes, key_id: str, ephemeral: bytes, recipient: bytes) -> bytes:
    """The AES-256 key of a hybrid value: HKDF-SHA256 over the X25519 shared secret, bound to the key id and
    both public keys."""
    info = b"warehouse-gdpr archive x25519 v1|" + key_id.encode() + b"|" + ephemeral + recipient
    return HKDF(algorithm=hashes.SHA256(), length=ARCHIVE_KEY_BYTES, salt=None, info=info).derive(shared)


def _key_map(extra: Mapping[str, object], name: str, conn_id: str) -> dict[str, bytes]:
    """A {key id: base64 key} field of a connection extra, each key checked for its size; {} when absent."""
    raw = extra.get(name)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise KeyConfigError(f"connection {conn_id!r}: {name} (key id -> base64 key) is missing")
    out: dict[str, bytes] = {}
    for key_id, value in raw.items():
        key = _b64(value, f"{name}[{key_id!r}]", conn_id)
        if len(key) != 32:
            need = "AES-256 needs" if name in ("archive_keys", "store_keys") else "an X25519 key is"
            raise KeyConfigError(f"connection {conn_id!r}: {name}[{key_id!r}] is {len(key)} bytes, {need} exactly 32")
        out[str(key_id)] = key
    return out


def _merge(archive_keys: dict[str, bytes], store_keys: dict[str, bytes], name: str, conn_id: str) -> dict[str, bytes]:
    for key_id in store_keys:
        if key_id in archive_keys:
            raise KeyConfigError(f"connection {conn_id!r}: key id {key_id!r} appears twice (archive_keys, {name})")
    return {**archive_keys, **store_keys}


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
    """Fresh random key material in the earlier, symmetric layout (one AES key for the archive and the
    engine's records, in the keys connection): what deployments before hybrid archive keys hold."""
    return {
        "hmac_key_id": "pepper-1",
        "hmac_pepper": base64.b64encode(os.urandom(32)).decode(),
        "archive_key_id": "archive-1",
        "archive_keys": {"archive-1": base64.b64encode(os.urandom(32)).decode()},
    }


def generate_extras() -> tuple[dict[str, object], dict[str, object]]:
    """Fresh random key material: (the keys connection's extra: pepper, store key, the archive's X25519
    public key; the archive's private connection's extra: its private key). Used by the demo and tests."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes_raw()
    keys_extra: dict[str, object] = {
        "hmac_key_id": "pepper-1",
        "hmac_pepper": base64.b64encode(os.urandom(32)).decode(),
        "store_key_id": "store-1",
        "store_keys": {"store-1": base64.b64encode(os.urandom(32)).decode()},
        "archive_key_id": "archive-x1",
        "archive_public_keys": {"archive-x1": base64.b64encode(private.public_key().public_bytes_raw()).decode()},
    }
    return keys_extra, {"archive_private_keys": {"archive-x1": base64.b64encode(raw_private).decode()}}


def main() -> None:
    """``python -m warehouse_gdpr.engine.crypto``: print fresh keys as two lines of an env file, each a
    connection extra as JSON without spaces: ``GDPR_KEYS_EXTRA`` (the keys connection, every task) and
    ``GDPR_ARCHIVE_PRIVATE_EXTRA`` (the archive's private key: the legal / accounting side and the access
    request only), e.g. for the compose stack's ``.env``. Store them in your secrets backend."""
    import json

    keys_extra, private_extra = generate_extras()
    print(f"GDPR_KEYS_EXTRA='{json.dumps(keys_extra, separators=(',', ':'))}'")
    print(f"GDPR_ARCHIVE_PRIVATE_EXTRA='{json.dumps(private_extra, separators=(',', ':'))}'")


if __name__ == "__main__":
    main()
