"""The same application with two mistakes: a field of `ctx.input` that does not exist, and
a handler of an untyped `Context` on a typed workflow."""

from __future__ import annotations

from typed_app import OrderIn, hello, order

import durable


@order.step
async def typo(ctx: durable.Context[OrderIn]) -> str:
    return ctx.input.skew


order.step("untyped", hello)
