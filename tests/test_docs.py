"""docs/policy.md cannot drift from the policy model, and its examples are valid policy YAML."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from warehouse_gdpr.engine.policy import Policy, key_descriptions, key_paths, load_policy

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
# A key's row: | `key` | type | default | meaning |  (a literal "|" inside a cell is written "\|")
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$", flags=re.MULTILINE)


def _meanings() -> dict[str, str]:
    """{key: its "meaning" cell} from the reference tables, whitespace normalised."""
    out = {}
    for key, rest in ROW.findall(DOC):
        cells = re.split(r"(?<!\\)\|", rest)
        assert len(cells) == 3, f"docs/policy.md: the row of {key} needs 4 cells (key, type, default, meaning)"
        out[key] = " ".join(cells[2].replace("\\|", "|").split())
    return out


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


def test_every_policy_key_has_a_description() -> None:
    missing = [key for key, text in key_descriptions().items() if not text.strip()]
    assert not missing, f"fields of plugins/warehouse_gdpr/engine/policy.py without a description=: {missing}"
    assert list(key_descriptions()) == key_paths()


def test_the_docs_meaning_of_each_key_is_the_models_description() -> None:
    documented = _meanings()
    described = {key: " ".join(text.split()) for key, text in key_descriptions().items()}
    differing = sorted(key for key in described.keys() & documented.keys() if described[key] != documented[key])
    assert not differing, (
        "the meaning column of docs/policy.md and the description= of the model "
        "(plugins/warehouse_gdpr/engine/policy.py) "
        "differ for: " + "; ".join(f"{k}: docs {documented[k]!r} != model {described[k]!r}" for k in differing)
    )


def test_the_json_schema_carries_the_descriptions() -> None:
    schema = Policy.model_json_schema()
    descriptions = key_descriptions()
    assert schema["properties"]["subject"]["description"] == descriptions["subject"]
    rule = schema["$defs"]["Rule"]["properties"]
    assert rule["retain_for"]["description"] == descriptions["rules[].retain_for"]
    assert rule["clock"]["description"] == descriptions["rules[].clock"]
    # The field's own description wins over the one of its type (QualifiedName says "schema.table").
    assert schema["$defs"]["Subject"]["properties"]["table"]["description"] == descriptions["subject.table"]
    assert schema["$defs"]["MappedTable"]["properties"]["table"]["description"] == descriptions["tables[].table"]
    undescribed = [
        f"{name}.{prop}"
        for name, definition in [("Policy", schema), *schema["$defs"].items()]
        for prop, spec in definition.get("properties", {}).items()
        if not spec.get("description")
    ]
    assert not undescribed, f"JSON Schema properties without a description: {undescribed}"


def test_the_committed_json_schema_is_the_models_and_the_demo_policy_validates() -> None:
    import json

    import jsonschema

    from warehouse_gdpr.engine.policy import Policy

    committed = json.loads((ROOT / "docs" / "policy.schema.json").read_text(encoding="utf-8"))
    assert committed == Policy.model_json_schema(), "docs/policy.schema.json is stale: run `make schema`"
    demo = yaml.safe_load((ROOT / "include" / "policy.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(demo, committed)
    assert (ROOT / "include" / "policy.yaml").read_text().startswith(
        "# yaml-language-server: $schema=../docs/policy.schema.json\n"
    )
