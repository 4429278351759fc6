"""Order fulfillment as a saga: reserve inventory, charge payment (a child step),
schedule shipping; if a step fails, the completed ones are compensated in reverse order.

Run it: ``python examples/order_fulfillment.py`` (uses ./stepsource.db).
"""

from __future__ import annotations

from typing import Any

import anyio

import stepsource as ss


class Warehouse:
    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}

    def reserve(self, order_id: str, qty: int) -> str:
        self.reserved[order_id] = qty
        return f"res-{order_id}"

    def release(self, reservation: str) -> None:
        self.reserved.pop(reservation.removeprefix("res-"), None)


class Carrier:
    def schedule(self, order_id: str, address: str) -> str:
        if not address:
            raise ValueError(f"order {order_id} has no shipping address")
        return f"ship-{order_id}"


def register(engine: ss.Engine) -> None:
    engine.register_service("warehouse", factory=Warehouse)
    engine.register_service("carrier", factory=Carrier)

    @engine.step("processPayment", version="1")
    async def process_payment(ctx: ss.StepContext, orderId: str, total: int) -> dict[str, Any]:
        approved = total <= 1000
        return {"approved": approved, "transactionId": f"tx-{orderId}" if approved else None}

    @engine.step("orderFulfillment", version="1")
    async def order_fulfillment(
        ctx: ss.StepContext,
        orderId: str,
        total: int,
        qty: int = 1,
        address: str = "",
    ) -> dict[str, Any]:
        warehouse: Warehouse = ctx.get_service("warehouse")
        carrier: Carrier = ctx.get_service("carrier")
        await ctx.set_state("orderStatus", "PROCESSING")
        try:
            async with ctx.saga("order") as saga:
                reservation = await saga.step(
                    "reserveInventory",
                    lambda: warehouse.reserve(orderId, qty),
                    compensate=warehouse.release,
                )
                payment = await ctx.run_step("processPayment", {"orderId": orderId, "total": total})
                if not payment["approved"]:
                    await ctx.set_state("orderStatus", "PAYMENT_FAILED")
                    raise RuntimeError("payment declined")
                await ctx.set_state("orderStatus", "PAYMENT_APPROVED")
                shipment = await saga.step(
                    "scheduleShipping", lambda: carrier.schedule(orderId, address)
                )
        except (RuntimeError, ss.SubStepFailedError) as error:
            await ctx.set_state("orderStatus", "COMPENSATED")
            return {
                "status": "failed",
                "orderId": orderId,
                "reason": str(error),
                "compensated": saga.compensated,
            }
        await ctx.set_state("orderStatus", "FULFILLED")
        return {
            "status": "success",
            "orderId": orderId,
            "reservation": reservation,
            "transactionId": payment["transactionId"],
            "shipment": shipment,
        }


async def main() -> None:
    engine = ss.Engine()
    register(engine)
    async with engine:
        ok = await engine.start("orderFulfillment", {"orderId": "A1", "total": 120, "address": "x"})
        declined = await engine.start("orderFulfillment", {"orderId": "A2", "total": 5000})
        print(await ok.result(), await declined.result(), sep="\n")


if __name__ == "__main__":
    anyio.run(main)
