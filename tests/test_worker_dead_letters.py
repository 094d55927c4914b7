"""Deliveries that cannot be commands: dead-lettered with the reason, answered, never looped."""

from dataclasses import dataclass

import pytest

from tests.amqp_helpers import (
    NO_MESSAGE_ID,
    Latin1,
    Outgoing,
    ask,
    command,
    open_amqp,
    setup_agent,
)
from tests.db_helpers import balances, ledger_ids, processed_ids, reader
from tests.inprocess import running
from token_budget.schemas import (
    DEAD_LETTER_QUEUE,
    HEADER_ERROR,
    HEADER_ERROR_CODE,
    ErrorReply,
    OkReply,
    parse_reply,
)
from token_budget.worker.app import Worker
from token_budget.worker.settings import Settings


@dataclass(frozen=True)
class Bad:
    """A delivery the worker must refuse as ``invalid_command``; ``expect`` is in its reason."""

    name: str
    body: bytes
    expect: str
    routing_key: str = "good-0"
    message_id: str | None = None
    content_type: str = "application/json"


MAX_BODY = 1024


def bad_messages(agent: str) -> list[Bad]:
    consume = command("consume", agent, 1)
    return [
        Bad("not_json", b"consume 5 tokens please", "Invalid JSON", agent),
        Bad("non_utf8", consume.decode().encode("utf-16"), "Invalid JSON", agent),
        Bad("json_array", b"[" + consume + b"]", "Input should be an object", agent),
        Bad("unknown_type", command("refund", agent, 1), "'refund'", agent),
        Bad(
            "missing_type",
            b'{"agent_id": "%s", "tokens": 1}' % agent.encode(),
            "discriminator 'type'",
            agent,
        ),
        Bad(
            "unknown_field",
            b'{"type": "consume", "agent_id": "%s", "tokens": 1, "model": "x"}' % agent.encode(),
            "consume.model: Extra inputs are not permitted",
            agent,
        ),
        Bad(
            "tokens_string",
            consume.replace(b"1}", b'"1"}'),
            "consume.tokens: Input should be a valid integer",
            agent,
        ),
        Bad(
            "tokens_float",
            consume.replace(b"1}", b"1.0}"),
            "consume.tokens: Input should be a valid integer",
            agent,
        ),
        Bad(
            "tokens_bool",
            consume.replace(b"1}", b"true}"),
            "consume.tokens: Input should be a valid integer",
            agent,
        ),
        Bad("tokens_zero", command("consume", agent, 0), "greater than or equal to 1", agent),
        Bad(
            "tokens_over_2_53",
            command("consume", agent, 2**53 + 1),
            f"less than or equal to {2**53}",
            agent,
        ),
        Bad(
            "bad_agent_id",
            command("consume", "no spaces allowed", 1),
            "consume.agent_id: String should match pattern",
            "no spaces allowed",
        ),
        Bad(
            "no_message_id",
            consume,
            "must carry an AMQP message_id",
            agent,
            message_id=NO_MESSAGE_ID,
        ),
        Bad(
            "oversized",
            consume[:-1] + b" " * MAX_BODY + b"}",
            f"exceeds the limit of {MAX_BODY} bytes",
            agent,
        ),
        Bad(
            "wrong_content_type",
            consume,
            "content_type must be application/json",
            agent,
            content_type="text/plain",
        ),
        Bad("routing_key_not_agent", consume, f"must equal agent_id '{agent}'", "someone-else"),
    ]


async def test_invalid_messages_are_dead_lettered_and_answered_while_valid_ones_apply(
    worker_settings: Settings, database_url: str
) -> None:
    settings = worker_settings.model_copy(update={"max_body_bytes": MAX_BODY})
    agents = [f"good-{n}" for n in range(4)]
    bad = [case for n, agent in enumerate(agents) for case in bad_messages(agent)[n::4]]
    assert {case.name for case in bad} == {case.name for case in bad_messages("x")}
    good: list[tuple[str, str, int]] = []  # (agent, message_id, tokens)
    worker = Worker(settings)
    async with open_amqp(str(settings.amqp_url.get_secret_value())) as amqp:
        async with running(worker) as [task]:
            for agent in agents:
                await setup_agent(amqp, agent, 1000)
            reply_to, replies = await amqp.reply_queue()
            # Each bad delivery sits between good ones of the same agent, in one lane.
            for n, case in enumerate(bad):
                agent = agents[n % 4]
                for step in (0, 1):
                    message_id = f"{agent}:c{n}.{step}"
                    good.append((agent, message_id, n + step + 1))
                    await amqp.publish(
                        Outgoing(
                            command("consume", agent, n + step + 1),
                            agent,
                            message_id=message_id,
                            reply_to=reply_to,
                            correlation_id=f"good:{message_id}",
                        )
                    )
                    if step == 0:
                        await amqp.publish(
                            Outgoing(
                                case.body,
                                case.routing_key,
                                message_id=case.message_id or f"bad-{case.name}",
                                reply_to=reply_to,
                                correlation_id=f"bad:{case.name}",
                                content_type=case.content_type,
                            )
                        )
            await replies.wait_count(len(bad) + len(good), within=60)
            assert not task.done(), "the worker stopped"
        # Stopped: every unacknowledged delivery would be back in its queue.
        backlog = await amqp.lane_backlog(settings.partitions)
        dead = await amqp.take_all(DEAD_LETTER_QUEUE)

    answers = replies.by_correlation()
    dead_by_case = {}
    for message in dead:
        dead_by_case.setdefault(message.correlation_id, []).append(message)
    problems: dict[str, str] = {}
    for case in bad:
        answer = [parse_reply(m.body) for m in answers.get(f"bad:{case.name}", [])]
        letters = dead_by_case.get(f"bad:{case.name}", [])
        if len(answer) != 1 or not isinstance(answer[0], ErrorReply):
            problems[case.name] = f"reply: {answer}"
        elif answer[0].error.code != "invalid_command" or (
            case.expect not in answer[0].error.message
        ):
            problems[case.name] = f"reply: {answer[0].error}"
        elif len(letters) != 1:
            problems[case.name] = f"{len(letters)} dead letters"
        else:
            headers = letters[0].headers or {}
            if headers.get(HEADER_ERROR_CODE) != "invalid_command" or case.expect not in str(
                headers.get(HEADER_ERROR)
            ):
                problems[case.name] = f"dead-letter headers: {headers}"
            elif letters[0].body != case.body:
                problems[case.name] = "dead letter's body differs from the delivery's"
    assert problems == {}
    assert len(dead) == len(bad), [m.correlation_id for m in dead]
    assert backlog == dict.fromkeys(backlog, 0)
    for _, message_id, _ in good:
        reply = parse_reply(answers[f"good:{message_id}"][0].body)
        assert isinstance(reply, OkReply), (message_id, reply)

    async with reader(database_url) as engine:
        assert await balances(engine) == {
            agent: (1000, sum(t for a, _, t in good if a == agent)) for agent in agents
        }
        assert await ledger_ids(engine) == {
            agent: [f"{agent}:allocate"] + [m for a, m, _ in good if a == agent] for agent in agents
        }
        setup = {f"{agent}:{kind}" for agent in agents for kind in ("register_agent", "allocate")}
        assert await processed_ids(engine) == setup | {m for _, m, _ in good}


@pytest.mark.sqlite_only
async def test_dead_letter_keeps_header_bytes_that_are_not_utf8(
    worker: Worker, amqp_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await ask(amqp, Outgoing(command("register_agent", "h"), "h", message_id="h:1"))
        reply_to, replies = await amqp.reply_queue()
        headers = {"x-note": Latin1("caf\xe9"), "x-trace": {"hops": [Latin1("\xff"), 2]}}
        await amqp.publish(
            Outgoing(
                b"not json",
                "h",
                message_id="h:bad",
                reply_to=reply_to,
                correlation_id="bad",
                headers=headers,
            )
        )
        reply = parse_reply((await replies.reply("bad")).body)
        # Answered once that batch is settled: its dead letter is in the queue.
        await ask(amqp, Outgoing(command("get_budget", "h"), "h"))
        [dead] = await amqp.take_all(DEAD_LETTER_QUEUE)

    assert isinstance(reply, ErrorReply)
    assert reply.error.code == "invalid_command"
    kept = dead.headers or {}
    assert kept[HEADER_ERROR_CODE] == "invalid_command"
    assert bytes(kept["x-note"]) == b"caf\xe9"
    assert bytes(kept["x-trace"]["hops"][0]) == b"\xff"
