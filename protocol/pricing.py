"""Pricing rules: how a seller answers a bid and how a buyer answers a counter.

The buyer's first bid states the most it will pay: its value for the offer.
A seller whose reserve (the least it will take) is above that value rejects,
so there is no deal when the reserve exceeds the value. Otherwise the seller
names the price:

* ``fixed``: the ask, if the value reaches it (else no deal);
* ``nash``: the Nash bargaining split of the surplus between reserve and
  value, ``reserve + share * (value - reserve)``, where `share` is the
  seller's bargaining power (0.5 splits the surplus equally). The ask caps
  the price, since the seller advertised it.

A seller accepts the bid outright when its price equals the bid, and counters
with its price otherwise; the buyer accepts any counter at or below its
value. Every agreed price therefore lies between the seller's reserve and
the buyer's value. All amounts are integers in the smallest unit of money.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import LocalProtocolError


class PricingPolicy(enum.Enum):
    FIXED = "fixed"
    NASH = "nash"


@dataclass(frozen=True)
class SellerPricing:
    ask: int
    reserve: int
    policy: PricingPolicy = PricingPolicy.NASH
    share: float = 0.5

    def __post_init__(self) -> None:
        if self.ask < 0 or self.reserve < 0:
            raise LocalProtocolError(f"ask {self.ask} and reserve {self.reserve} must not be negative")
        if self.reserve > self.ask:
            raise LocalProtocolError(f"reserve {self.reserve} is above the ask {self.ask}")
        if not 0.0 <= self.share <= 1.0:
            raise LocalProtocolError(f"seller share {self.share} must be in [0, 1]")


def seller_price(pricing: SellerPricing, value: int) -> int | None:
    """Return the seller's price for a buyer whose bid (its value) is `value`, or None for no deal."""
    if value < pricing.reserve:
        return None
    if pricing.policy is PricingPolicy.FIXED:
        return pricing.ask if value >= pricing.ask else None
    surplus = value - pricing.reserve
    price = pricing.reserve + int(pricing.share * surplus)
    return min(price, pricing.ask)


def buyer_accepts(price: int, value: int) -> bool:
    """Return whether a buyer takes `price`: any price at or below its value."""
    return 0 <= price <= value


# Buyer: valuation ------------------------------------------------------------


def claimed_gain(own_loss: float | None, claimed_loss_ppm: int | None) -> float | None:
    """Return the gain a seller's claimed validation loss suggests, or None.

    Both losses are mean cross-entropy on each side's own validation data;
    the suggestion is the relative drop from this node's loss to the seller's,
    and never below 0.
    """
    if own_loss is None or claimed_loss_ppm is None or own_loss <= 0:
        return None
    claimed = claimed_loss_ppm / 1_000_000
    return max(0.0, (own_loss - claimed) / own_loss)


def expected_gain(
    *,
    claimed: float | None,
    history: Sequence[float],
    prior: float,
    pseudo_count: float = 2.0,
    decay: float = 0.5,
) -> float:
    """Estimate the relative gain of one more purchase of a seller's weights.

    `history` holds the gains this node measured on earlier purchases from
    the same seller and family, oldest first. Their exponentially weighted
    mean (weight `decay` per older purchase) is shrunk towards a base, as if
    the base were `pseudo_count` purchases. The base is the mean of the
    seller's claim and `prior`, or `prior` alone without a claim: a claim
    compares validation losses on different data, so it is only half the
    evidence. Gains below 0 count as 0.
    """
    base = prior if claimed is None else (claimed + prior) / 2
    if not history:
        return max(0.0, base)
    weights = [decay**age for age in range(len(history) - 1, -1, -1)]
    mean = sum(w * max(0.0, g) for w, g in zip(weights, history, strict=True)) / sum(weights)
    observed = len(history) / (len(history) + pseudo_count)
    return max(0.0, observed * mean + (1 - observed) * base)


def offer_value(gain: float, value_per_gain: float) -> int:
    """Return a purchase's worth: expected gain times the worth of a unit of gain."""
    return max(0, int(gain * value_per_gain))


@dataclass(frozen=True)
class Candidate:
    """An offer the buyer could bid on."""

    key: bytes
    ask: int
    value: int

    @property
    def most_it_costs(self) -> int:
        """Every agreed price is at most the ask and at most the buyer's bid (its value)."""
        return min(self.ask, self.value)


class Budget:
    """Spending limits in all and per round, never exceeded.

    Amounts are charged when a bid is made (its most possible cost) and
    settled to the real price afterwards, so purchases in flight count.
    """

    def __init__(self, *, total: int, per_round: int | None = None, spent: int = 0) -> None:
        if total < 0 or (per_round is not None and per_round < 0):
            raise LocalProtocolError("budgets must not be negative")
        self.total = total
        self.per_round = per_round
        self.spent = spent
        self.spent_this_round = 0

    def available(self) -> int:
        left = self.total - self.spent
        if self.per_round is not None:
            left = min(left, self.per_round - self.spent_this_round)
        return max(0, left)

    def fits(self, amount: int) -> bool:
        return 0 <= amount <= self.available()

    def charge(self, amount: int) -> None:
        if not self.fits(amount):
            raise LocalProtocolError(f"{amount} does not fit the budget ({self.available()} left)")
        self.spent += amount
        self.spent_this_round += amount

    def refund(self, amount: int) -> None:
        """Give back what a bid reserved but did not spend."""
        if amount < 0 or amount > self.spent_this_round:
            raise LocalProtocolError(f"cannot refund {amount}")
        self.spent -= amount
        self.spent_this_round -= amount

    def new_round(self) -> None:
        self.spent_this_round = 0


def choose_purchases(candidates: Sequence[Candidate], budget: Budget, *, max_count: int | None = None) -> list[Candidate]:
    """Offers to bid on, best expected value per price first, within the budget.

    Offers worth nothing to this node are skipped; so is any whose most
    possible cost no longer fits what the budget has left.
    """
    ranked = sorted(
        (c for c in candidates if c.value > 0),
        key=lambda c: (-(c.value / c.ask) if c.ask > 0 else -float("inf"), c.key),
    )
    chosen: list[Candidate] = []
    left = budget.available()
    for candidate in ranked:
        if max_count is not None and len(chosen) >= max_count:
            break
        if candidate.most_it_costs <= left:
            chosen.append(candidate)
            left -= candidate.most_it_costs
    return chosen


# Seller: asks, reserves and whom to sell to ------------------------------------


class AskPolicy(enum.Enum):
    FIXED = "fixed"
    COST = "cost"
    ADAPTIVE = "adaptive"


def ask_price(
    policy: AskPolicy,
    *,
    base: int,
    total_bytes: int = 0,
    cost_per_mib: float = 0.0,
    margin: float = 0.0,
    previous: int | None = None,
    sold: int = 0,
    step: float = 0.2,
    minimum: int = 1,
    maximum: int = 10**12,
) -> int:
    """Return the ask of a new offer.

    * fixed: `base`;
    * cost: transfer cost of the offered bytes plus a margin,
      ``ceil(MiB * cost_per_mib * (1 + margin))``, at least `minimum`;
    * adaptive: the previous ask raised by `step` after a round with sales
      and lowered by `step` after a round without, within [minimum, maximum].
    """
    if policy is AskPolicy.FIXED:
        return base
    if policy is AskPolicy.COST:
        return max(minimum, math.ceil(total_bytes / 2**20 * cost_per_mib * (1 + margin)))
    current = base if previous is None else previous
    factor = 1 + step if sold > 0 else 1 - step
    return int(min(maximum, max(minimum, round(current * factor))))


def competitor_terms(*, ask: int, reserve: int, buyer_gain: float, value_per_gain: float) -> tuple[int, int]:
    """Ask and reserve for a buyer that competes with this seller.

    The seller counts the buyer's expected gain as its own loss, worth
    `value_per_gain` per unit, so both rise by that loss.
    """
    loss = offer_value(buyer_gain, value_per_gain)
    return ask + loss, reserve + loss


def may_sell(*, owed: int, outstanding: int, price: int, credit_limit: int, refusals: int, max_refusals: int | None) -> str | None:
    """Why a seller will not sell to a buyer, or None when it will.

    `owed` is what the buyer already owes this seller by the ledger and
    `outstanding` the prices of sales delivered or in flight but unsettled.
    """
    if max_refusals is not None and refusals >= max_refusals:
        return f"the buyer refused to pay {refusals} times"
    if owed + outstanding + price > credit_limit:
        return f"the buyer would owe {owed + outstanding + price}, more than the credit limit {credit_limit}"
    return None
