"""Document approval: a signal decides, a query shows the state, and the flow
waits (holding no worker) until the condition holds.

Run it: ``python examples/document_approval.py`` (uses ./stepsource.db).
"""

from __future__ import annotations

from typing import Any

import anyio

import stepsource as ss


def register(engine: ss.Engine) -> None:
    @engine.step("documentApproval", version="1")
    async def document_approval(
        ctx: ss.StepContext,
        documentId: str,
        reviewerId: str,
    ) -> dict[str, Any]:
        await ctx.set_state(
            "approvalState",
            {"status": "PENDING", "document": documentId, "assignedTo": reviewerId, "comments": []},
        )

        async def approval_decision(decision: dict[str, Any]) -> None:
            state = await ctx.get_state("approvalState")
            await ctx.set_state(
                "approvalState",
                {
                    **state,
                    "status": "APPROVED" if decision["approved"] else "REJECTED",
                    "comments": [*state["comments"], {"text": decision["comment"]}],
                },
            )

        async def get_approval_state() -> Any:
            return await ctx.get_state("approvalState")

        async def decided() -> bool:
            return bool((await ctx.get_state("approvalState"))["status"] != "PENDING")

        ctx.on_signal("approvalDecision", approval_decision)
        ctx.on_query("getApprovalState", get_approval_state)
        ctx.log("Waiting for approval decision...")
        await ctx.wait_for_condition(decided)
        final = await ctx.get_state("approvalState")
        return {
            "documentId": documentId,
            "approved": final["status"] == "APPROVED",
            "comments": final["comments"],
        }


async def main() -> None:
    engine = ss.Engine()
    register(engine)
    async with engine:
        handle = await engine.start("documentApproval", {"documentId": "D1", "reviewerId": "R"})
        await anyio.sleep(0.5)
        print("query:", await handle.query("getApprovalState"))
        await handle.signal("approvalDecision", {"approved": True, "comment": "LGTM"})
        print(await handle.result())


if __name__ == "__main__":
    anyio.run(main)
