"""One error taxonomy: every engine exception is a ConfigurationError (fail at once) or a TransientError
(retry), and keeps the builtin base its callers catch."""

from __future__ import annotations

import pytest

from warehouse_gdpr.engine.catalog import CatalogError
from warehouse_gdpr.engine.crypto import KeyConfigError, Keys
from warehouse_gdpr.engine.erasure import RequestError
from warehouse_gdpr.engine.errors import (
    ConfigurationError,
    TransientError,
    UnmappedForeignKey,
)
from warehouse_gdpr.engine.optout import OptOutError, ShareError
from warehouse_gdpr.engine.policy import Policy, PolicyError
from warehouse_gdpr.engine.propagation import TargetNotAcknowledged
from warehouse_gdpr.engine.register import RegisterIncomplete
from warehouse_gdpr.engine.schema import SchemaError
from warehouse_gdpr.engine.sweep import select_rules


@pytest.mark.parametrize(
    ("error", "kind", "builtin"),
    [
        (PolicyError, ConfigurationError, ValueError),
        (CatalogError, ConfigurationError, ValueError),
        (SchemaError, ConfigurationError, RuntimeError),
        (KeyConfigError, ConfigurationError, ValueError),
        (RequestError, ConfigurationError, ValueError),
        (OptOutError, ConfigurationError, ValueError),
        (RegisterIncomplete, ConfigurationError, ValueError),
        (UnmappedForeignKey, ConfigurationError, RuntimeError),
        (TargetNotAcknowledged, TransientError, RuntimeError),
        (ShareError, TransientError, RuntimeError),
    ],
)
def test_each_engine_exception_is_configuration_or_transient(error: type, kind: type, builtin: type) -> None:
    assert issubclass(error, kind) and issubclass(error, builtin)
    other = TransientError if kind is ConfigurationError else ConfigurationError
    assert not issubclass(error, other)


def test_an_unknown_key_id_is_a_configuration_error(keys: Keys) -> None:
    with pytest.raises(ConfigurationError, match="archive key 'gone' is not in the keys connection"):
        keys.decrypt("gone", b"0" * 12, b"x", b"aad")


def test_an_unknown_rule_name_is_a_configuration_error(policy: Policy) -> None:
    with pytest.raises(ConfigurationError, match="unknown rule"):
        select_rules(policy, ["everyone"])
