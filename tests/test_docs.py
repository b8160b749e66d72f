"""docs/policy.md cannot drift from the policy model, and its examples are valid policy YAML."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from warehouse_gdpr.policy import key_paths, load_policy

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")


def test_every_policy_key_is_documented_and_no_other() -> None:
    documented = re.findall(r"^\| `([^`]+)` \|", DOC, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), "a key is documented twice"
    assert set(documented) == set(key_paths()), (
        f"missing from docs/policy.md: {sorted(set(key_paths()) - set(documented))}; "
        f"documented but not in the model: {sorted(set(documented) - set(key_paths()))}"
    )


def test_every_section_has_a_yaml_example_that_parses() -> None:
    examples = re.findall(r"```yaml\n(.*?)```", DOC, flags=re.DOTALL)
    assert len(examples) >= 8
    sections = set()
    for example in examples:
        data = yaml.safe_load(example)
        assert isinstance(data, dict)
        sections |= set(data)
    top_level = {k for k in key_paths() if "." not in k and "[" not in k} - {"version", "batch_size"}
    assert top_level <= sections


def test_the_demo_policy_the_docs_point_to_loads() -> None:
    assert load_policy(ROOT / "include" / "policy.yaml").version == 1
