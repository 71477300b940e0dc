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
    """The price a seller asks of a buyer whose bid (value) is `value`; None for no deal."""
    if value < pricing.reserve:
        return None
    if pricing.policy is PricingPolicy.FIXED:
        return pricing.ask if value >= pricing.ask else None
    surplus = value - pricing.reserve
    price = pricing.reserve + int(pricing.share * surplus)
    return min(price, pricing.ask)


def buyer_accepts(price: int, value: int) -> bool:
    """A buyer accepts any price at or below its value."""
    return 0 <= price <= value
