"""Keys, keyed hashes and the archive cipher (warehouse_gdpr.engine.crypto). No database needed."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from warehouse_gdpr.engine.crypto import (
    ARCHIVE_KEY_BYTES,
    KeyConfigError,
    Keys,
    archive_aad,
    generate_extra,
    normalise_email,
)

PEPPER = base64.b64encode(b"p" * 32).decode()
OLD_KEY = base64.b64encode(b"k" * 32).decode()


def _extra(**changes: Any) -> dict[str, Any]:
    """A valid extra with some fields changed; a field given as None is removed."""
    extra: dict[str, Any] = {
        "hmac_key_id": "pepper-1",
        "hmac_pepper": PEPPER,
        "archive_key_id": "archive-1",
        "archive_keys": {"archive-1": OLD_KEY},
    }
    for key, value in changes.items():
        if value is None:
            extra.pop(key, None)
        else:
            extra[key] = value
    return extra


def _refused(extra: dict[str, Any], conn_id: str = "gdpr_keys") -> str:
    with pytest.raises(KeyConfigError) as info:
        Keys.from_extra(extra, conn_id=conn_id)
    return str(info.value)


def _secrets(extra: dict[str, Any]) -> list[str]:
    """Every secret string of an extra (the pepper and the archive keys, as given)."""
    values = [extra.get("hmac_pepper")] + list((extra.get("archive_keys") or {}).values())
    return [v for v in values if isinstance(v, str) and v]


# -- Keys.from_extra ---------------------------------------------------------------------------


def test_valid_extra_builds_keys() -> None:
    keys = Keys.from_extra(_extra())
    assert keys.hmac_key_id == "pepper-1"
    assert keys.pepper == b"p" * 32
    assert keys.archive_key_id == "archive-1"
    assert dict(keys.archive_keys) == {"archive-1": b"k" * 32}


def test_generated_extra_is_valid() -> None:
    extra = generate_extra()
    keys = Keys.from_extra(extra)
    assert len(keys.pepper) == 32
    assert len(keys.archive_keys[keys.archive_key_id]) == ARCHIVE_KEY_BYTES
    assert generate_extra()["hmac_pepper"] != extra["hmac_pepper"]  # random, not a constant


@pytest.mark.parametrize("value", [None, "", 42])
def test_missing_pepper(value: Any) -> None:
    assert _refused(_extra(hmac_pepper=value), conn_id="vault_keys") == (
        "connection 'vault_keys': hmac_pepper is missing from the connection extra"
    )


def test_missing_hmac_key_id() -> None:
    assert _refused(_extra(hmac_key_id=None)) == (
        "connection 'gdpr_keys': hmac_key_id is missing from the connection extra"
    )


def test_short_pepper() -> None:
    short = base64.b64encode(b"s3cr3t-but-short-31-bytes-long!").decode()
    message = _refused(_extra(hmac_pepper=short))
    assert message == "connection 'gdpr_keys': hmac_pepper is 31 bytes, at least 32 are required"
    assert short not in message and "s3cr3t" not in message


def test_pepper_not_base64() -> None:
    bad = "this is !! not base64 but a secret pass phrase"
    message = _refused(_extra(hmac_pepper=bad))
    assert message == "connection 'gdpr_keys': hmac_pepper is not valid base64"
    assert "secret" not in message


def test_archive_key_not_base64() -> None:
    bad = "not*base64*" + "x" * 40
    message = _refused(_extra(archive_keys={"archive-1": bad}))
    assert message == "connection 'gdpr_keys': archive_keys['archive-1'] is not valid base64"
    assert bad not in message


@pytest.mark.parametrize("size", [16, 24, 31, 33, 64])
def test_archive_key_must_be_32_bytes(size: int) -> None:
    key = base64.b64encode(os.urandom(size)).decode()
    message = _refused(_extra(archive_keys={"archive-1": OLD_KEY, "archive-2": key}, archive_key_id="archive-1"))
    assert message == (
        f"connection 'gdpr_keys': archive_keys['archive-2'] is {size} bytes, AES-256 needs exactly 32"
    )
    assert key not in message and OLD_KEY not in message


@pytest.mark.parametrize("archive_keys", [None, {}, "archive-1=abc", ["archive-1"]])
def test_archive_keys_missing_or_not_a_mapping(archive_keys: Any) -> None:
    assert _refused(_extra(archive_keys=archive_keys)) == (
        "connection 'gdpr_keys': archive_keys (key id -> base64 key) is missing"
    )


@pytest.mark.parametrize("active", [None, "archive-9", "", 1])
def test_archive_key_id_must_name_one_of_archive_keys(active: Any) -> None:
    message = _refused(_extra(archive_key_id=active))
    assert message == "connection 'gdpr_keys': archive_key_id must name one of archive_keys"
    assert OLD_KEY not in message and PEPPER not in message


def test_errors_never_include_secret_values() -> None:
    """Whatever is wrong, no message of from_extra contains a secret given to it."""
    bad_extras = [
        _extra(hmac_pepper=base64.b64encode(b"tiny-pepper").decode()),
        _extra(hmac_pepper="%%%" + PEPPER),
        _extra(archive_keys={"archive-1": base64.b64encode(b"tiny-key").decode()}),
        _extra(archive_keys={"archive-1": "@@" + OLD_KEY}),
        _extra(archive_key_id="archive-2"),
    ]
    for extra in bad_extras:
        message = _refused(extra)
        for secret in _secrets(extra):
            assert secret not in message
        assert "tiny" not in message


def test_repr_shows_no_key_material() -> None:
    new_key = os.urandom(32)
    keys = Keys.from_extra(
        _extra(archive_keys={"archive-1": OLD_KEY, "archive-2": base64.b64encode(new_key).decode()},
               archive_key_id="archive-2")
    )
    expected = "Keys(hmac_key_id='pepper-1', archive_key_id='archive-2', archive_key_ids=['archive-1', 'archive-2'])"
    assert repr(keys) == str(keys) == f"{keys}" == expected
    assert repr([keys]) == f"[{expected}]"
    for text in (repr(keys), repr({"keys": keys})):
        for secret in (PEPPER, OLD_KEY, base64.b64encode(new_key).decode(), repr(b"p" * 32), repr(new_key)):
            assert secret not in text


# -- archive cipher ----------------------------------------------------------------------------


@pytest.fixture
def keys() -> Keys:
    return Keys.from_extra(generate_extra())


def test_encrypt_decrypt_round_trip(keys: Keys) -> None:
    plaintext = '{"email": "hélène.dupont@acme.example", "first_name": "Hélène"}'.encode()
    aad = archive_aad("crm.contacts", "42", keys.archive_key_id)
    key_id, nonce, ciphertext = keys.encrypt(plaintext, aad)
    assert key_id == keys.archive_key_id == "archive-1"
    assert len(nonce) == 12
    assert plaintext not in ciphertext
    assert len(ciphertext) == len(plaintext) + 16  # GCM tag
    assert keys.decrypt(key_id, nonce, ciphertext, aad) == plaintext


def test_each_encryption_uses_a_fresh_nonce(keys: Keys) -> None:
    aad = archive_aad("crm.contacts", "42", keys.archive_key_id)
    first, second = keys.encrypt(b"same", aad), keys.encrypt(b"same", aad)
    assert first[1] != second[1]
    assert first[2] != second[2]


def test_archive_aad_binds_table_pk_and_key_id() -> None:
    assert archive_aad("crm.notes", "7", "archive-1") == b"crm.notes|7|archive-1"


def test_decrypt_with_a_wrong_key_fails(keys: Keys) -> None:
    aad = archive_aad("crm.contacts", "42", keys.archive_key_id)
    key_id, nonce, ciphertext = keys.encrypt(b"secret row", aad)
    other = Keys.from_extra(generate_extra())  # same key id 'archive-1', different key
    assert other.archive_key_id == key_id
    with pytest.raises(InvalidTag):
        other.decrypt(key_id, nonce, ciphertext, aad)


def test_decrypt_with_another_rows_aad_fails(keys: Keys) -> None:
    key_id, nonce, ciphertext = keys.encrypt(b"secret row", archive_aad("crm.contacts", "42", keys.archive_key_id))
    for aad in (
        archive_aad("crm.contacts", "43", key_id),  # another row's pk
        archive_aad("crm.notes", "42", key_id),  # same pk, another table
        archive_aad("crm.contacts", "42", "archive-0"),  # claims another key id
        b"",
    ):
        with pytest.raises(InvalidTag):
            keys.decrypt(key_id, nonce, ciphertext, aad)


def test_tampered_ciphertext_or_nonce_fails(keys: Keys) -> None:
    aad = archive_aad("crm.contacts", "42", keys.archive_key_id)
    key_id, nonce, ciphertext = keys.encrypt(b"secret row", aad)
    flipped = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    with pytest.raises(InvalidTag):
        keys.decrypt(key_id, nonce, flipped, aad)
    with pytest.raises(InvalidTag):
        keys.decrypt(key_id, bytes([nonce[0] ^ 1]) + nonce[1:], ciphertext, aad)


def test_unknown_key_id_is_named(keys: Keys) -> None:
    aad = archive_aad("crm.contacts", "42", keys.archive_key_id)
    _, nonce, ciphertext = keys.encrypt(b"secret row", aad)
    with pytest.raises(KeyConfigError) as info:
        keys.decrypt("archive-2099", nonce, ciphertext, aad)
    assert str(info.value) == "archive key 'archive-2099' is not in the keys connection"


def test_old_key_still_decrypts_after_rotation() -> None:
    before = _extra()
    old = Keys.from_extra(before)
    aad_old = archive_aad("crm.contacts", "42", old.archive_key_id)
    old_row = old.encrypt(b"archived in 2025", aad_old)
    assert old_row[0] == "archive-1"

    new_key = base64.b64encode(os.urandom(32)).decode()
    rotated = Keys.from_extra(
        _extra(archive_keys={"archive-1": OLD_KEY, "archive-2": new_key}, archive_key_id="archive-2")
    )
    # Old rows decrypt with the key id stored on the row ...
    assert rotated.decrypt(old_row[0], old_row[1], old_row[2], aad_old) == b"archived in 2025"
    # ... new rows use the new active key ...
    aad_new = archive_aad("crm.contacts", "43", rotated.archive_key_id)
    new_row = rotated.encrypt(b"archived in 2026", aad_new)
    assert new_row[0] == "archive-2"
    assert rotated.decrypt(*new_row, aad_new) == b"archived in 2026"
    # ... which the old key set does not know.
    with pytest.raises(KeyConfigError):
        old.decrypt(*new_row, aad_new)
    # Once the old key is dropped from the connection, its rows no longer decrypt.
    dropped = Keys.from_extra(_extra(archive_keys={"archive-2": new_key}, archive_key_id="archive-2"))
    with pytest.raises(KeyConfigError):
        dropped.decrypt(old_row[0], old_row[1], old_row[2], aad_old)


# -- keyed hashes ------------------------------------------------------------------------------


def test_normalise_email() -> None:
    assert normalise_email("  John.Doe@Example.COM \n") == "john.doe@example.com"
    assert normalise_email("ｊｏｈｎ@ｅｘａｍｐｌｅ.com") == "john@example.com"


@pytest.mark.parametrize(
    "spelling",
    [
        "john@example.com",
        "JOHN@EXAMPLE.COM",
        "John@Example.com",
        "  john@example.com",
        "john@example.com \t\n",
        "\u00a0john@example.com\u3000",  # no-break space and ideographic space
        "ｊｏｈｎ@ｅｘａｍｐｌｅ.com",  # fullwidth letters
        "ＪＯＨＮ＠ＥＸＡＭＰＬＥ．ＣＯＭ",  # fullwidth everything, @ and . included
    ],
)
def test_every_spelling_of_an_address_has_one_subject_hash(keys: Keys, spelling: str) -> None:
    assert keys.subject_hash(spelling) == keys.subject_hash("john@example.com")


def test_subject_hash_is_hmac_sha256_hex_of_the_normalised_address() -> None:
    import hashlib
    import hmac

    keys = Keys.from_extra(_extra())
    expected = hmac.new(b"p" * 32, b"john@example.com", hashlib.sha256).hexdigest()
    assert keys.subject_hash(" John@Example.com ") == expected
    assert len(expected) == 64


def test_different_addresses_have_different_hashes(keys: Keys) -> None:
    assert keys.subject_hash("john@example.com") != keys.subject_hash("jon@example.com")
    assert keys.subject_hash("john@example.com") != keys.subject_hash("john@example.org")


def test_different_peppers_give_different_hashes() -> None:
    first = Keys.from_extra(_extra())
    second = Keys.from_extra(_extra(hmac_pepper=base64.b64encode(b"q" * 32).decode()))
    assert first.subject_hash("john@example.com") != second.subject_hash("john@example.com")
    assert first.hash_value("+33 6 12 34 56 78") != second.hash_value("+33 6 12 34 56 78")


def test_hash_value_does_not_normalise() -> None:
    """hash_value pseudonymises a column value as is; only subject_hash normalises an email."""
    keys = Keys.from_extra(_extra())
    assert keys.hash_value("John") != keys.hash_value("john")
    assert keys.hash_value("john") == keys.subject_hash("JOHN")


def test_command_line_prints_fresh_usable_keys() -> None:
    """`python -m warehouse_gdpr.engine.crypto` (README, compose stack): two lines of an env file, the keys
    connection's extra and the archive's private connection's, each JSON without spaces, valid keys that
    belong together, different every time."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "plugins")}
    outputs = [subprocess.run([sys.executable, "-m", "warehouse_gdpr.engine.crypto"], capture_output=True, text=True,
                              env=env, check=True, timeout=60).stdout for _ in range(2)]
    for out in outputs:
        assert out.count("\n") == 2 and " " not in out
        keys_line, private_line = out.splitlines()
        assert keys_line.startswith("GDPR_KEYS_EXTRA='") and keys_line.endswith("'")
        assert private_line.startswith("GDPR_ARCHIVE_PRIVATE_EXTRA='") and private_line.endswith("'")
        keys_extra = json.loads(keys_line.split("=", 1)[1][1:-1])
        private_extra = json.loads(private_line.split("=", 1)[1][1:-1])
        assert "archive_private_keys" not in keys_extra and set(private_extra) == {"archive_private_keys"}
        keys = Keys.from_extra(keys_extra).with_private(private_extra)
        assert len(keys.pepper) == 32 and keys.archive_is_hybrid
        aad = archive_aad("crm.invoices", "1", keys.archive_key_id)
        assert keys.decrypt(*keys.archive_encrypt(b"row", aad), aad) == b"row"
    assert outputs[0] != outputs[1]
