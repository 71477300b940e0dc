"""The market agent: train, offer and buy, round by round.

A round has two phases. `prepare` trains the agent's model for one epoch on
this node's shard and, when the selling schedule says so, publishes an offer
for the new version with its validation metrics as the claim. `trade` values
every live offer of the model's family from other sellers, picks the best
expected value per price within the budgets, and buys them one after the
other through the full trade path, so each is tried against the model as the
earlier purchases of the round left it. Merged weights are the next round's
starting point.

A devnet calls the phases on every node in step; with ``[agent] enabled``
a node runs rounds on its own timer. The decisions themselves are the pure
functions of `protocol.pricing`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from node.buyer import BuyError
from node.models import ModelError, ModelVersion
from node.publish import OfferRequest, parse_terms
from protocol import limits
from protocol.deal import DealState
from protocol.identity import peer_id_to_text
from protocol.messages import Role
from protocol.offers import ValidOffer
from protocol.pricing import (
    AskPolicy,
    Budget,
    Candidate,
    ask_price,
    choose_purchases,
    claimed_gain,
    expected_gain,
    offer_value,
)

if TYPE_CHECKING:
    from node.daemon import Node

logger = logging.getLogger(__name__)

DEAL_TIMEOUT_S = 300.0


@dataclass
class RoundReport:
    round: int
    model: str = ""
    val_loss: float | None = None
    val_accuracy: float | None = None
    offer_id: str | None = None
    ask: int | None = None
    purchases: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "model": self.model,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "offer_id": self.offer_id,
            "ask": self.ask,
            "purchases": self.purchases,
            "skipped": self.skipped,
        }


class MarketAgent:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.config.agent
        market = node.config.market
        _, spent = node.trades.ledger.totals()
        self.budget = Budget(
            total=market.budget,
            per_round=self.settings.round_budget or None,
            spent=spent,
        )
        self.last_ask: int | None = None
        self.last_offer: bytes | None = None
        self.best_loss: float | None = None
        self.improved = True
        self.rounds_done = 0

    # Schedules ----------------------------------------------------------------

    def offers_in(self, round_index: int) -> bool:
        s = self.settings
        if not s.sell or round_index < s.offer_start_round or (round_index - s.offer_start_round) % s.offer_every:
            return False
        return self.improved or not s.offer_on_improvement

    def trades_in(self, round_index: int) -> bool:
        s = self.settings
        return s.buy and round_index >= s.trade_start_round and (round_index - s.trade_start_round) % s.trade_every == 0

    # Phases ---------------------------------------------------------------------

    async def prepare(self, round_index: int) -> RoundReport:
        """Train one epoch and publish an offer if the schedule says so."""
        node = self.node
        report = RoundReport(round_index)
        name = self.settings.model
        if node.models.latest(name) is None:
            await node.init_model(name)
        version = await node.train_model(name, epochs=1)
        report.model = version.ref
        report.val_loss = version.metrics.get("val_loss")
        report.val_accuracy = version.metrics.get("val_accuracy")
        if report.val_loss is not None:
            self.improved = self.best_loss is None or report.val_loss < self.best_loss
            if self.improved:
                self.best_loss = report.val_loss

        if self.offers_in(round_index):
            ask = self._next_ask(version)
            payment, min_gain_ppm = parse_terms(self.settings.terms)
            metrics = tuple(
                (key, round(version.metrics[key] * limits.PPM)) for key in ("val_accuracy", "val_loss") if key in version.metrics
            )
            published = await node.publish(
                OfferRequest(
                    model=version.ref,
                    price=ask,
                    tensors=tuple(self.settings.offer_tensors),
                    expires_s=self.settings.offer_expires_s,
                    payment=payment,
                    min_gain_ppm=min_gain_ppm,
                    offer_key=name,
                    metrics=metrics,
                )
            )
            self.last_ask, self.last_offer = ask, published.offer_id
            report.offer_id, report.ask = published.offer_id.hex(), ask
        return report

    def _next_ask(self, version: ModelVersion) -> int:
        s = self.settings
        policy = AskPolicy(s.ask_policy)
        sold = 0
        if self.last_offer is not None:
            sold = sum(
                1
                for deal in self.node.trades.deals.list(role=Role.SELLER)
                if deal.offer_id == self.last_offer and deal.state is DealState.PAID
            )
        return ask_price(
            policy,
            base=s.price,
            total_bytes=version.total_bytes,
            cost_per_mib=s.cost_per_mib,
            margin=s.margin,
            previous=self.last_ask,
            sold=sold,
            step=s.adapt_step,
            minimum=s.min_price,
            maximum=s.max_price,
        )

    async def trade(self, round_index: int, report: RoundReport | None = None) -> RoundReport:
        """Value the live offers and buy the best ones, one at a time."""
        node = self.node
        report = report or RoundReport(round_index)
        self.budget.new_round()
        if not self.trades_in(round_index):
            return report
        mine = node.models.latest(self.settings.model)
        if mine is None:
            return report

        candidates, offers = self._candidates(mine, report)
        chosen = choose_purchases(
            candidates, self.budget, max_count=self.settings.max_purchases_per_round or None
        )
        for candidate in chosen:
            valid = offers[candidate.key]
            await self._buy(valid, candidate, report)
        self.rounds_done += 1
        return report

    def _candidates(self, mine: ModelVersion, report: RoundReport) -> tuple[list[Candidate], dict[bytes, ValidOffer]]:
        node = self.node
        own_loss = mine.metrics.get("val_loss")
        traded = {deal.offer_id for deal in node.trades.deals.list(role=Role.BUYER)}
        candidates: list[Candidate] = []
        offers: dict[bytes, ValidOffer] = {}
        for valid in node.gossip.book.live(node.now_ms(), [mine.family]):
            offer = valid.offer
            if offer.seller == node.peer_id or valid.offer_id in traded:
                continue
            gain = expected_gain(
                claimed=claimed_gain(own_loss, offer.metric("val_loss")),
                history=self.gain_history(offer.seller, offer.family),
                prior=self.settings.prior_gain,
            )
            value = offer_value(gain, self.settings.value_per_gain)
            if value <= 0:
                report.skipped.append({"offer_id": valid.offer_id.hex(), "seller": peer_id_to_text(offer.seller),
                                       "why": "worth nothing to this node", "expected_gain": gain})
                continue
            candidates.append(Candidate(valid.offer_id, offer.price, value))
            offers[valid.offer_id] = valid
        return candidates, offers

    def gain_history(self, seller: bytes, family: bytes) -> list[float]:
        """Gains measured on this node's finished purchases from `seller`, oldest first."""
        gains = []
        for deal in self.node.trades.deals.list(role=Role.BUYER, states={DealState.PAID, DealState.REFUSED}):
            if deal.counterparty == seller and deal.offer.family == family and deal.gain_ppm is not None:
                gains.append(deal.gain_ppm / limits.PPM)
        return gains

    async def _buy(self, valid: ValidOffer, candidate: Candidate, report: RoundReport) -> None:
        node = self.node
        # The bid states this node's value, which the Nash split needs, but
        # never more than the budget could pay. It is also the most the
        # purchase can cost (a seller may ask more than its public ask, of a
        # competitor), so the whole bid is held until the deal ends.
        bid = min(candidate.value, self.budget.available())
        if bid <= 0:
            return
        reserved = bid
        self.budget.charge(reserved)
        entry: dict[str, Any] = {"offer_id": valid.offer_id.hex(), "seller": peer_id_to_text(valid.offer.seller),
                                 "ask": candidate.ask, "value": candidate.value, "bid": bid}
        try:
            record = await node.trades.buyer.buy(valid, max_price=bid)
        except BuyError as exc:
            self.budget.refund(reserved)
            entry.update(state="rejected", reason=exc.reason.name.lower(), detail=str(exc))
            report.purchases.append(entry)
            logger.info("Agent: no deal for offer %s: %s", valid.offer_id.hex()[:12], exc)
            return

        finished = node.trades.buyer.finished[record.deal_id]
        with trio.move_on_after(DEAL_TIMEOUT_S):
            await finished.wait()
        final = node.trades.deals.get(record.deal_id)
        assert final is not None
        paid = final.price if final.state is DealState.PAID else 0
        self.budget.refund(reserved - paid)
        entry.update(
            deal_id=final.deal_id.hex(),
            price=final.price,
            state=final.state.value,
            gain=None if final.gain_ppm is None else final.gain_ppm / limits.PPM,
            reason=final.reason,
            model=f"{final.model}@{final.model_version}" if final.model else "",
        )
        report.purchases.append(entry)

    async def run_round(self, round_index: int, *, settle_s: float = 2.0) -> RoundReport:
        """Both phases, with a pause between them for other nodes' offers to arrive."""
        report = await self.prepare(round_index)
        await trio.sleep(settle_s)
        return await self.trade(round_index, report)

    async def run_forever(self) -> None:
        """Run the node's own train-and-trade loop: one round every `round_s` seconds."""
        round_index = 0
        while True:
            started = trio.current_time()
            try:
                report = await self.run_round(round_index, settle_s=min(5.0, self.settings.round_s / 4))
                logger.info("Agent round %d: %s, %d purchases", round_index, report.model, len(report.purchases))
            except ModelError as exc:
                logger.error("Agent round %d failed: %s", round_index, exc)
            round_index += 1
            await trio.sleep(max(0.0, started + self.settings.round_s - trio.current_time()))
