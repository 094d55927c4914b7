"""docs/asyncapi.json is the models rendered: regenerate it and compare."""

import json
import re
from pathlib import Path
from typing import Any

from token_budget.schemas import CommandType, ThresholdCrossedEvent
from token_budget.schemas.asyncapi import DEFAULT_PATH, build, main, render

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_the_checked_in_document_matches_the_models() -> None:
    assert DEFAULT_PATH.read_text() == render(), "run: python -m token_budget.schemas.asyncapi"


def test_the_check_mode_fails_on_a_stale_document(tmp_path: Path) -> None:
    stale = tmp_path / "asyncapi.json"
    stale.write_text("{}\n")
    assert main(["--output", str(stale), "--check"]) == 1
    assert main(["--output", str(stale)]) == 0
    assert main(["--output", str(stale), "--check"]) == 0


def test_every_reference_in_the_document_resolves() -> None:
    document = build()
    for ref in refs(document):
        assert ref.startswith("#/"), ref
        resolve(document, ref)


def test_every_command_type_is_a_message_of_the_commands_channel() -> None:
    document = build()
    assert set(document["channels"]["commands"]["messages"]) == {t.value for t in CommandType}
    assert document["asyncapi"] == "3.0.0"


def test_the_event_schema_in_protocol_md_is_the_models() -> None:
    text = PROTOCOL.read_text()
    blocks = re.findall(r"<!-- threshold-event-schema -->\s*```json\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/protocol.md lost its threshold event schema block"
    assert json.loads(blocks[0]) == ThresholdCrossedEvent.model_json_schema()
