"""The README's SDK snippets are docs/examples/sdk_*.py, verbatim, and they run
as written against a real worker."""

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from token_budget.worker.app import Worker

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("sdk_*.py"))


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_every_python_block_in_the_readme_is_an_example_file_verbatim() -> None:
    files = {path.name: path.read_text() for path in EXAMPLES}
    assert len(files) == 4, files.keys()
    blocks = readme_python_blocks()
    assert sorted(blocks) == sorted(files.values()), (
        "README.md's ```python blocks must be docs/examples/sdk_*.py, verbatim"
    )


async def run_example(path: Path, amqp_url: str) -> tuple[int, str, str]:
    # A subprocess, as a user runs it: the in-process worker shares this event loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(path),
        cwd=ROOT,
        # LiteLLM would fetch its price list at import; offline it waits for
        # retries first (the variable is LiteLLM's own).
        env={**os.environ, "BUDGET_AMQP_URL": amqp_url, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "sdk_basics.py",
            "agent-7: used 1200, 98800 available\n"
            "refused: insufficient_budget: agent 'agent-7' asked for 10000000 tokens, "
            "98800 available\n",
        ),
        # 400 tokens reported, then a hold of 2000 never reported: charged whole.
        ("sdk_reservation.py", "agent-8: used 2400, 97600 available\n"),
        ("sdk_periods.py", "agent-9: 50000 available until 00:00\n"),
    ],
)
async def test_the_readme_example_runs_as_written(
    worker: Worker, amqp_url: str, name: str, expected: str
) -> None:
    code, out, err = await run_example(ROOT / "docs" / "examples" / name, amqp_url)
    assert (code, out) == (0, expected), err


async def test_the_llm_example_charges_both_calls_exactly(worker: Worker, amqp_url: str) -> None:
    code, out, err = await run_example(ROOT / "docs" / "examples" / "sdk_llm.py", amqp_url)
    assert code == 0, err
    found = re.fullmatch(r"agent-10: used (\d+) = (\d+) \+ (\d+)\n", out)
    assert found is not None, out
    total, held, streamed = map(int, found.groups())
    assert total == held + streamed and held > 0 and streamed > 0
