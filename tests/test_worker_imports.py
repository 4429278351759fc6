"""A worker pays for pydantic only when its steps need it.

pydantic's import and its schema machinery hold about 9 MB of a worker's resident memory. A
step that takes only the context has no input model, and a worker whose steps all do runs
without importing pydantic; its published input schema is still the one pydantic would have
generated, so clients validating against it see no difference.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
from hypothesis import given
from hypothesis import strategies as st

from stepsource.engine.definitions import build_definition, empty_input_schema


@given(st.text(min_size=1, max_size=30))
def test_the_schema_of_a_parameterless_step_is_the_one_pydantic_generates(step_id: str) -> None:
    async def handler(ctx: object) -> None:
        return None

    definition = build_definition(handler, step_id, "1")
    title = "".join(ch if ch.isalnum() else "_" for ch in step_id) + "_input"
    model: type[pydantic.BaseModel] = pydantic.create_model(title)
    expected: dict[str, object] = model.model_json_schema()
    assert definition.input_model is None
    assert empty_input_schema(step_id) == expected
    assert definition.input_schema() == expected
    assert definition.input_kwargs({"ignored": 1}) == {}
    # the public validation still gives a model, the empty one pydantic would have built
    assert definition.validate_input({"ignored": 1}).model_dump() == {}
    assert definition.model.model_json_schema() == expected


def test_a_worker_with_parameterless_steps_never_imports_pydantic(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import anyio
        import stepsource as ss

        async def main(path):
            engine = ss.Engine(f"sqlite:///{path}", workers=4)

            @engine.step("plain")
            async def plain(ctx):
                await ctx.set_state("n", 1)
                done = await ctx.do("work", lambda: {"ok": True})
                await ctx.create_checkpoint()
                return {"done": done, "n": await ctx.get_state("n")}

            async with engine:
                handle = await engine.start("plain")
                result = await handle.result()
                record = await engine.describe(handle.execution_id)
            print(result, record.status, "pydantic" in sys.modules)

        anyio.run(main, sys.argv[1])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "w.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out[-1] == "False", "a worker without typed inputs imported pydantic"
    assert "completed" in out[-2].lower()
