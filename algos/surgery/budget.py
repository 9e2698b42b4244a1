"""One MAC budget spent across many layers: Factorize's per-layer ranks, FFF-replace's per-block leaf widths.

Each unit (a layer or a block) can be rebuilt at sizes s_1 < s_2 < ... (ranks, leaf widths) costing c(s) MACs with a
relative squared error e(s), or kept dense at its dense cost D (error 0). We want

    min  sum_u e_u(s_u)    subject to    sum_u c_u(s_u) <= budget * sum_u D_u.

Greedy: every unit starts at its smallest size; each step grows the unit whose error falls most per MAC spent,
    gain = (e(s_k) - e(s_{k+1})) / (c(s_{k+1}) - c(s_k)),
which is optimal when error falls with diminishing returns (a convex error-vs-MACs curve). A step whose next size
would cost at least D keeps the unit dense instead. Errors are asked for lazily, only for sizes the greedy reaches,
so a unit whose error must be measured (FFF builds a tree per size) is measured a few times, not at every size.

Written here because the allocation is over our own rebuilt modules (no library budgets MACs across mixed surgeries).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class BudgetTooSmall(ValueError):
    """Even the smallest size of every unit exceeds the budget; ``smallest_share`` is what they keep of the MACs (the
    algorithm words the message in its own settings)."""

    def __init__(self, smallest_share: float, message: str | None = None):
        super().__init__(message or f"the smallest sizes keep {smallest_share:.1%} of the MACs")
        self.smallest_share = smallest_share


@dataclass
class BudgetUnit:
    """One layer or block: its candidate ``sizes`` (ascending), ``cost(size)`` in MACs, ``dense_cost``, and
    ``error(size)``, the relative squared error at that size (read lazily and remembered)."""

    sizes: Sequence[int]
    cost: Callable[[int], float]
    dense_cost: float
    error: Callable[[int], float]
    _errors: dict[int, float] = field(default_factory=dict, repr=False)

    def error_at(self, size: int | None) -> float:
        if size is None:
            return 0.0
        if size not in self._errors:
            self._errors[size] = self.error(size)
        return self._errors[size]

    def cost_at(self, size: int | None) -> float:
        return self.dense_cost if size is None else self.cost(size)

    def smallest(self) -> int | None:
        """The smallest size, or None (dense) where no size costs less than the dense unit."""
        return self.sizes[0] if self.sizes and self.cost(self.sizes[0]) < self.dense_cost else None

    def grown(self, size: int) -> int | None:
        """The next size after ``size``, or None (dense) where there is none or it costs at least the dense unit."""
        bigger = [s for s in self.sizes if s > size]
        return bigger[0] if bigger and self.cost(bigger[0]) < self.dense_cost else None


def allocate_budget(units: list[BudgetUnit], budget: float) -> list[int | None]:
    """Each unit's size (None: keep it dense) keeping at most ``budget`` of the units' dense MACs (see the module)."""
    sizes = [unit.smallest() for unit in units]
    dense_total = sum(unit.dense_cost for unit in units)
    spent = sum(unit.cost_at(size) for unit, size in zip(units, sizes, strict=True))
    allowed = budget * dense_total
    if spent > allowed * (1 + 1e-9):
        raise BudgetTooSmall(spent / dense_total)
    spare = allowed - spent

    def push(index: int) -> None:
        unit, size = units[index], sizes[index]
        grown = unit.grown(size)
        step_cost = unit.cost_at(grown) - unit.cost_at(size)
        gain = unit.error_at(size) - unit.error_at(grown)
        heapq.heappush(heap, (-gain / step_cost, index, step_cost, grown))

    heap: list = []
    for index, size in enumerate(sizes):
        if size is not None:
            push(index)
    while heap:
        _, index, step_cost, grown = heapq.heappop(heap)
        if step_cost > spare:
            continue  # this unit stops here; cheaper steps of other units may still fit
        spare -= step_cost
        sizes[index] = grown
        if grown is not None:
            push(index)
    return sizes
