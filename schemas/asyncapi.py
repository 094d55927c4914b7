"""The contract as an AsyncAPI 3.0 document, generated from the models here.

``python -m token_budget.schemas.asyncapi`` writes ``docs/asyncapi.json``;
``python -m token_budget.schemas.asyncapi --check`` exits 1 when the file differs from the
models (CI runs the same comparison in tests/test_asyncapi.py). Only the
standard library and pydantic: the document is the models, rendered.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .commands import (
    Allocate,
    Commit,
    Consume,
    ExpireReservations,
    GetAvailable,
    GetBudget,
    RegisterAgent,
    RegisterGroup,
    Release,
    Reserve,
    SetGroup,
    SetPeriod,
    SetThresholds,
)
from .events import ThresholdCrossedEvent
from .replies import ErrorReply, OkReply, RefusedEvent
from .topology import COMMANDS_EXCHANGE, CONTENT_TYPE, EVENTS_EXCHANGE, QUERIES_QUEUE

__all__ = ["CONTRACT_VERSION", "DEFAULT_PATH", "build", "main", "render"]

#: Bumped with every change of the contract: 1.1 added reservations and
#: threshold events to the commands, replies and refusals of 1.0; 1.2 routes
#: by a stable function of the agent id (a fanout budget.commands in front of
#: the internal x-modulus-hash budget.lanes) and adds the code wrong_lane; 1.3
#: adds committed queries (the queue budget.queries, the query field
#: consistency, the reply fields consistency and as_of); 1.4 adds budget
#: periods (the command set_period, the reply fields period, timezone,
#: period_start and resets_at); 1.5 adds group budgets (register_group,
#: set_group, group_id on register_agent and on the commands that take an
#: agent or a group, the reply field group_id, error.limited_by, the codes
#: group_not_found and holds_open, group_id on threshold events).
CONTRACT_VERSION: Final = "1.5.0"
DEFAULT_PATH: Final = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.json"

_REF = "#/components/schemas/{model}"
_COMMANDS: list[tuple[type[BaseModel], str]] = [
    (RegisterAgent, "Create the agent if it is new, optionally in a group."),
    (
        RegisterGroup,
        "Create a group (routing key: group_id) under parent_id, if it is new. "
        "Its budget limits every member, sub-groups' included.",
    ),
    (
        SetGroup,
        "Move the agent to another group (null: none) from now on; refused while it holds.",
    ),
    (
        Allocate,
        "Add tokens to the budget of the agent or the group (exactly one of agent_id, "
        "group_id; the routing key is that id).",
    ),
    (Consume, "Use tokens: refused when more than available."),
    (
        GetBudget,
        "Query: the budget, unchanged (expires overdue holds first). "
        'On budget.queries with "consistency": "committed": at once, as last committed.',
    ),
    (GetAvailable, "Query: like get_budget."),
    (Reserve, "Hold tokens before a call whose cost is unknown; the reply names the hold."),
    (Commit, "Settle a hold with the tokens really used; the rest is freed."),
    (Release, "Free a hold unused."),
    (SetThresholds, "Replace the budget's usage thresholds (percent)."),
    (
        SetPeriod,
        "Reset usage to 0 at every calendar boundary of period in timezone, from the next "
        "one on (null: never). Replies then carry period, timezone, period_start, resets_at.",
    ),
    (
        ExpireReservations,
        "INTERNAL, reserved for the workers' sweeper: expire the agent's overdue holds now.",
    ),
]
_REPLIES: list[tuple[type[BaseModel], str]] = [
    (OkReply, "Success: the budget after the command; reserve's reply names the hold."),
    (ErrorReply, "Refusal or invalid command: branch on error.code."),
]


def _message(name: str, model: type[BaseModel], summary: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "title": model.__name__,
        "summary": summary,
        "contentType": CONTENT_TYPE,
        "payload": {"$ref": _REF.format(model=model.__name__)},
        **extra,
    }


def _type_of(model: type[BaseModel]) -> str:
    return str(model.model_fields["type"].annotation.__args__[0])  # type: ignore[union-attr]


def build() -> dict[str, Any]:
    """The AsyncAPI document as plain data (deterministic for given models)."""
    models = [m for m, _ in _COMMANDS + _REPLIES] + [ThresholdCrossedEvent, RefusedEvent]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    correlation = {"location": "$message.header#/correlation_id"}
    messages: dict[str, Any] = {}
    for model, summary in _COMMANDS:
        messages[_type_of(model)] = _message(_type_of(model), model, summary)
    for model, summary in _REPLIES:
        name = "okReply" if model is OkReply else "errorReply"
        messages[name] = _message(name, model, summary, correlationId=correlation)
    messages["thresholdCrossed"] = _message(
        "threshold_crossed",
        ThresholdCrossedEvent,
        "Usage crossed a threshold; published once per crossing from the outbox. "
        "message_id = event_id: deduplicate on it.",
        bindings={"amqp": {"messageType": "threshold_crossed", "bindingVersion": "0.3.0"}},
    )
    messages["commandRefused"] = _message(
        "command_refused",
        RefusedEvent,
        "A state-changing command sent without reply_to was refused.",
        bindings={"amqp": {"messageType": "command_refused", "bindingVersion": "0.3.0"}},
    )
    commands = [_type_of(m) for m, _ in _COMMANDS]
    queries = [_type_of(GetBudget), _type_of(GetAvailable)]

    def refs(channel: str, names: list[str]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in names]

    def own(names: list[str]) -> dict[str, Any]:
        return {n: {"$ref": f"#/components/messages/{n}"} for n in names}

    events = {"name": EVENTS_EXCHANGE, "type": "topic", "durable": True, "autoDelete": False}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Token budget service",
            "version": CONTRACT_VERSION,
            "description": "Agents publish budget commands over AMQP 0-9-1 and read replies "
            "and events. Generated from schemas/ by `python -m token_budget.schemas.asyncapi`; "
            "docs/protocol.md is the prose contract.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": {
            "commands": {
                "address": COMMANDS_EXCHANGE,
                "description": "Exchange of type fanout; its one destination, the internal "
                "x-modulus-hash exchange budget.lanes, picks each agent's lane by a pure function "
                "of the agent id (docs/protocol.md §2.1). Routing key = agent_id. "
                "State-changing commands carry a unique AMQP message_id (their identity).",
                "messages": own(commands),
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": COMMANDS_EXCHANGE, "type": "fanout", "durable": True},
                        "bindingVersion": "0.3.0",
                    }
                },
            },
            "queries": {
                "address": QUERIES_QUEUE,
                "description": "Quorum queue, published to through the default exchange "
                '(routing key = "budget.queries"). Takes only get_budget and get_available '
                'with "consistency": "committed": any worker answers at once from the last '
                "committed state, not behind the agent's lane (docs/protocol.md §4.3). "
                "Anything else is answered invalid_command and dead-lettered.",
                "messages": own(queries),
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {"name": QUERIES_QUEUE, "durable": True, "exclusive": False},
                        "bindingVersion": "0.3.0",
                    }
                },
            },
            "replies": {
                "address": None,
                "description": "The command's reply_to queue (or amq.rabbitmq.reply-to).",
                "messages": own(["okReply", "errorReply"]),
            },
            "thresholdEvents": {
                "address": "budget.threshold.{percent}",
                "description": f"Routing keys of the topic exchange {EVENTS_EXCHANGE}.",
                "parameters": {"percent": {"description": "The threshold, 1 to 100."}},
                "messages": own(["thresholdCrossed"]),
                "bindings": {
                    "amqp": {"is": "routingKey", "exchange": events, "bindingVersion": "0.3.0"}
                },
            },
            "refusedEvents": {
                "address": "budget.refused.{code}",
                "description": f"Routing keys of the topic exchange {EVENTS_EXCHANGE}.",
                "parameters": {"code": {"description": "The refusal's error code."}},
                "messages": own(["commandRefused"]),
                "bindings": {
                    "amqp": {"is": "routingKey", "exchange": events, "bindingVersion": "0.3.0"}
                },
            },
        },
        "operations": {
            "sendCommand": {
                "action": "send",
                "channel": {"$ref": "#/channels/commands"},
                "messages": refs("commands", commands),
                "reply": {
                    "address": {"location": "$message.header#/reply_to"},
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": refs("replies", ["okReply", "errorReply"]),
                },
            },
            "sendCommittedQuery": {
                "action": "send",
                "channel": {"$ref": "#/channels/queries"},
                "messages": refs("queries", queries),
                "reply": {
                    "address": {"location": "$message.header#/reply_to"},
                    "channel": {"$ref": "#/channels/replies"},
                    "messages": refs("replies", ["okReply", "errorReply"]),
                },
            },
            "receiveThresholdEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/thresholdEvents"},
                "messages": refs("thresholdEvents", ["thresholdCrossed"]),
            },
            "receiveRefusedEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/refusedEvents"},
                "messages": refs("refusedEvents", ["commandRefused"]),
            },
        },
        "components": {"messages": messages, "schemas": defs["$defs"]},
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m token_budget.schemas.asyncapi", description=__doc__
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is stale: run python -m token_budget.schemas.asyncapi",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
