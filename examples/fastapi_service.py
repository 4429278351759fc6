"""A small HTTP service on stepsource: FastAPI starts executions and reads their state, and
the same process runs the workers for as long as the application runs (``ss.lifespan``).

An order is priced in a sub-step, then waits (holding no worker) until someone approves it
over HTTP, then completes with a typed receipt. Run it with::

    pip install fastapi uvicorn
    STEPSOURCE_URL=sqlite:///service.db uvicorn --app-dir examples fastapi_service:app

and try::

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"order_id": "A1", "items": [3, 4]}'
    curl localhost:8000/orders/EXECUTION_ID
    curl -X POST localhost:8000/orders/EXECUTION_ID/approve -d '{"by": "ann"}' \\
         -H 'content-type: application/json'
    curl 'localhost:8000/orders/EXECUTION_ID/receipt?timeout=5'

Every process that shares the backend sees the same executions: run more workers with
``stepsource worker fastapi_service:engine`` (from the examples directory).
"""

from __future__ import annotations

from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import stepsource as ss

engine = ss.Engine()  # $STEPSOURCE_URL, else ./stepsource.db


class Receipt(pydantic.BaseModel):
    order_id: str
    total: int
    approved_by: str


@engine.step("orders.process", max_retries=2)
async def process_order(ctx: ss.StepContext, order_id: str, items: list[int]) -> Receipt:
    await ctx.set_state("status", "pricing")
    total = await ctx.do("price", lambda: sum(items))
    await ctx.update_state({"status": "awaiting approval", "total": total})
    approval = await ctx.wait_for_event("approval", timeout=24 * 3600)
    await ctx.set_state("status", "approved")
    return Receipt(order_id=order_id, total=total, approved_by=str(approval["by"]))


app = FastAPI(title="orders", lifespan=ss.lifespan(engine))


class NewOrder(pydantic.BaseModel):
    order_id: str
    items: list[int]


class Approval(pydantic.BaseModel):
    by: str


#: how each user error becomes an HTTP status (anything else is a 500)
STATUS = (
    (ss.UnknownExecutionError, 404),
    (ss.InputValidationError, 422),
    (ss.ResultTimeout, 202),  # not finished yet: ask again
    (ss.StepFailedError, 409),
    (ss.UsageError, 409),  # e.g. approving an order that already ended
)


@app.exception_handler(ss.StepsourceError)
async def stepsource_error(request: Request, error: Exception) -> JSONResponse:
    status = next((code for kind, code in STATUS if isinstance(error, kind)), 500)
    return JSONResponse({"error": str(error)}, status_code=status)


@app.post("/orders", status_code=202)
async def create_order(order: NewOrder) -> dict[str, str]:
    handle = await engine.start(process_order, order.model_dump())
    return {"execution_id": handle.execution_id}


@app.get("/orders/{execution_id}")
async def order_status(execution_id: str) -> dict[str, Any]:
    record = await engine.describe(execution_id)
    return {
        "execution_id": record.id,
        "status": record.status,
        "state": await engine.state_of(execution_id),
        "output": record.output,
    }


@app.post("/orders/{execution_id}/approve", status_code=202)
async def approve(execution_id: str, approval: Approval) -> dict[str, str]:
    await engine.get_handle(execution_id).send_event("approval", approval.model_dump())
    return {"execution_id": execution_id}


@app.get("/orders/{execution_id}/receipt")
async def receipt(execution_id: str, timeout: float = 10.0) -> Receipt:
    return await engine.get_handle(execution_id).result(timeout=timeout, type=Receipt)
