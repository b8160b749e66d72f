"""The archive encrypted to a public key (warehouse_gdpr.engine.crypto, issue 15): X25519 + HKDF-SHA256 +
AES-256-GCM, the private key in a separate connection. No database needed (the database cases are in
test_sweep.py, test_access.py, test_erasure.py and the DAG tests)."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from warehouse_gdpr.engine.crypto import KeyConfigError, Keys, archive_aad, generate_extra, generate_extras


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def extras() -> tuple[dict[str, Any], dict[str, Any]]:
    return generate_extras()


def test_the_archive_is_encrypted_to_the_public_key_and_read_with_the_private_one(extras) -> None:
    keys_extra, private_extra = extras
    engine = Keys.from_extra(keys_extra)  # what every task holds
    assert engine.archive_is_hybrid and not engine.archive_private_keys
    sealer = engine.archive_sealer()
    rows = {str(pk): f'{{"invoice_id": {pk}, "billing_name": "Zoé"}}'.encode() for pk in range(5)}
    sealed = {pk: sealer.seal(plain, archive_aad("crm.invoices", pk, sealer.key_id)) for pk, plain in rows.items()}
    legal = engine.with_private(private_extra)
    for pk, (nonce, ciphertext) in sealed.items():
        assert len(nonce) == 12 and rows[pk] not in ciphertext
        assert len(ciphertext) == 32 + len(rows[pk]) + 16  # the ephemeral public key, the body, the GCM tag
        aad = archive_aad("crm.invoices", pk, sealer.key_id)
        assert legal.decrypt(sealer.key_id, nonce, ciphertext, aad) == rows[pk]
    # One ephemeral key per sealer (a batch), a fresh nonce per row; another sealer, another ephemeral key.
    assert len({c[:32] for _, c in sealed.values()}) == 1
    assert len({n for n, _ in sealed.values()}) == len(sealed)
    assert engine.archive_sealer().seal(b"x", b"a")[1][:32] != next(iter(sealed.values()))[1][:32]


def test_without_the_private_connection_a_hybrid_row_does_not_decrypt_and_the_error_names_it(extras) -> None:
    keys_extra, private_extra = extras
    engine = Keys.from_extra(keys_extra, private_connection_id="legal_archive_key")
    aad = archive_aad("crm.invoices", "7", engine.archive_key_id)
    key_id, nonce, ciphertext = engine.archive_encrypt(b"secret row", aad)
    with pytest.raises(KeyConfigError) as info:
        engine.decrypt(key_id, nonce, ciphertext, aad)
    message = str(info.value)
    assert "'archive-x1'" in message and "'legal_archive_key'" in message and "private key" in message
    for secret in (*keys_extra["archive_public_keys"].values(), *private_extra["archive_private_keys"].values()):
        assert secret not in message
    # The private connection not defined (connections.load_keys with archive_private, legacy-style None).
    with pytest.raises(KeyConfigError, match="'legal_archive_key'"):
        engine.with_private(None).decrypt(key_id, nonce, ciphertext, aad)
    # A private connection that lacks this key id.
    other = {"archive_private_keys": {"archive-x0": _b64(X25519PrivateKey.generate().private_bytes_raw())}}
    with pytest.raises(KeyConfigError, match="its private key is not in the archive's private connection"):
        engine.with_private(other).decrypt(key_id, nonce, ciphertext, aad)


def test_a_wrong_private_key_or_an_altered_row_is_refused(extras) -> None:
    keys_extra, private_extra = extras
    legal = Keys.from_extra(keys_extra).with_private(private_extra)
    aad = archive_aad("crm.invoices", "42", legal.archive_key_id)
    key_id, nonce, ciphertext = legal.archive_encrypt(b"secret row", aad)
    # Another key pair listed under the same key id: refused (ECDH gives another key, the tag fails).
    stranger_keys, stranger_private = generate_extras()
    stranger = Keys.from_extra({**keys_extra, "archive_public_keys": stranger_keys["archive_public_keys"]})
    with pytest.raises(InvalidTag):
        stranger.with_private(stranger_private).decrypt(key_id, nonce, ciphertext, aad)
    # Another row's, table's or key id's associated data; an empty one.
    for other_aad in (archive_aad("crm.invoices", "43", key_id), archive_aad("crm.notes", "42", key_id),
                      archive_aad("crm.invoices", "42", "archive-x0"), b""):
        with pytest.raises(InvalidTag):
            legal.decrypt(key_id, nonce, ciphertext, other_aad)
    # A flipped bit in the ephemeral public key, the body, the tag or the nonce; a truncated value.
    for altered_nonce, altered in (
        (nonce, bytes([ciphertext[0] ^ 1]) + ciphertext[1:]),
        (nonce, ciphertext[:40] + bytes([ciphertext[40] ^ 1]) + ciphertext[41:]),
        (nonce, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])),
        (bytes([nonce[0] ^ 1]) + nonce[1:], ciphertext),
        (nonce, ciphertext[:20]),
        (nonce, bytes(32) + ciphertext[32:]),  # an ephemeral key of low order: no shared secret at all
    ):
        with pytest.raises(InvalidTag):
            legal.decrypt(key_id, altered_nonce, altered, aad)
    # Still whole: the cache of derived keys did not let an altered row through.
    assert legal.decrypt(key_id, nonce, ciphertext, aad) == b"secret row"


def test_old_symmetric_rows_stay_readable_after_switching_to_a_public_key() -> None:
    """The earlier layout: one AES key (archive-1) for everything. The switch: a store key for the engine's
    own records and a public key as the active archive key; archive-1 stays listed, first in the keys
    connection, then moved to the private connection, so that the engine's tasks can no longer read it."""
    before_extra = generate_extra()
    before = Keys.from_extra(before_extra)
    old_aad = archive_aad("crm.invoices", "1", "archive-1")
    old_row = before.archive_encrypt(b"archived in 2025", old_aad)
    old_outbox_aad = b"erasure|REQ-1|emailing|archive-1"
    old_outbox = before.encrypt(b"zoe@example.com", old_outbox_aad)
    assert old_row[0] == old_outbox[0] == "archive-1" and before.store_key_id == "archive-1"

    new_extra, private_extra = generate_extras()
    switched_extra = {**before_extra, "store_key_id": new_extra["store_key_id"], "store_keys": new_extra["store_keys"],
                      "archive_key_id": "archive-x1", "archive_public_keys": new_extra["archive_public_keys"]}
    engine = Keys.from_extra(switched_extra)
    legal = engine.with_private(private_extra)
    assert engine.archive_key_id == "archive-x1" and engine.store_key_id == "store-1"
    assert legal.decrypt(*old_row, old_aad) == b"archived in 2025"
    assert engine.decrypt(*old_outbox, old_outbox_aad) == b"zoe@example.com"  # pending outbox rows still go out
    new_aad = archive_aad("crm.invoices", "2", engine.archive_key_id)
    new_row = engine.archive_encrypt(b"archived in 2027", new_aad)
    assert new_row[0] == "archive-x1" and legal.decrypt(*new_row, new_aad) == b"archived in 2027"

    # Once no record under archive-1 is pending, archive-1 moves to the private connection.
    moved_private = {**private_extra, "archive_keys": {"archive-1": before_extra["archive_keys"]["archive-1"]}}
    engine = Keys.from_extra({k: v for k, v in switched_extra.items() if k != "archive_keys"})
    with pytest.raises(KeyConfigError, match="archive key 'archive-1' is not in the keys connection"):
        engine.decrypt(*old_row, old_aad)
    legal = engine.with_private(moved_private)
    assert legal.decrypt(*old_row, old_aad) == b"archived in 2025"
    assert legal.decrypt(*new_row, new_aad) == b"archived in 2027"


def test_the_engine_records_use_the_store_key_not_the_archive_key(extras) -> None:
    keys_extra, _ = extras
    engine = Keys.from_extra(keys_extra)
    key_id, nonce, ciphertext = engine.encrypt(b"zoe@example.com", b"request|REQ-1|erasure|store-1")
    assert key_id == "store-1" and engine.decrypt(key_id, nonce, ciphertext, b"request|REQ-1|erasure|store-1") == (
        b"zoe@example.com")


def _refused(extra: dict[str, Any], private: dict[str, Any] | None = None) -> str:
    with pytest.raises(KeyConfigError) as info:
        keys = Keys.from_extra(extra)
        if private is not None:
            keys.with_private(private, "gdpr_archive_private")
    return str(info.value)


def test_bad_key_layouts_are_refused_by_name_without_a_secret(extras) -> None:
    keys_extra, private_extra = extras
    no_store = {k: v for k, v in keys_extra.items() if k not in ("store_key_id", "store_keys")}
    assert "store_key_id must name one of store_keys" in _refused(no_store)
    assert "store_key_id must name one of store_keys" in _refused({**keys_extra, "store_key_id": "archive-x1"})
    short = {"archive-x1": _b64(os.urandom(31))}
    assert _refused({**keys_extra, "archive_public_keys": short}) == (
        "connection 'gdpr_keys': archive_public_keys['archive-x1'] is 31 bytes, an X25519 key is exactly 32")
    clash = {**keys_extra, "store_keys": {"archive-x1": keys_extra["store_keys"]["store-1"]},
             "store_key_id": "archive-x1"}
    assert "key id 'archive-x1' appears twice" in _refused(clash)
    assert _refused({**keys_extra, "archive_key_id": "archive-x9"}) == (
        "connection 'gdpr_keys': archive_key_id must name one of archive_keys or archive_public_keys")
    # A private key that is not the public key's pair.
    wrong = {"archive_private_keys": {"archive-x1": _b64(X25519PrivateKey.generate().private_bytes_raw())}}
    message = _refused(keys_extra, wrong)
    assert message == ("connection 'gdpr_archive_private': archive_private_keys['archive-x1'] is not the private "
                       "key of archive_public_keys['archive-x1'] in the keys connection")
    secrets = [*keys_extra["archive_public_keys"].values(), *private_extra["archive_private_keys"].values(),
               *wrong["archive_private_keys"].values(), *keys_extra["store_keys"].values()]
    for text in (message, _refused(no_store), _refused(clash)):
        assert not any(secret in text for secret in secrets)
    assert "not valid base64" in _refused(keys_extra, {"archive_private_keys": {"archive-x1": "@@"}})


def test_repr_shows_key_ids_only(extras) -> None:
    keys_extra, private_extra = extras
    legal = Keys.from_extra(keys_extra).with_private(private_extra)
    text = repr(legal) + repr(legal.archive_sealer())
    assert "archive-x1" in text and "store-1" in text
    for secret in (*keys_extra["archive_public_keys"].values(), *private_extra["archive_private_keys"].values(),
                   *keys_extra["store_keys"].values(), keys_extra["hmac_pepper"]):
        assert secret not in text
    raw = base64.b64decode(private_extra["archive_private_keys"]["archive-x1"])
    assert repr(raw) not in text
