"""The node's config.toml: defaults, the commented file `pmarket init` writes,
and loading with clear errors for bad values."""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message names the value."""


@dataclass
class NodeSection:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = False
    log_level: str = "info"


@dataclass
class LimitsSection:
    max_connections: int = 128
    max_connections_per_peer: int = 2
    max_streams: int = 1024
    max_inbound_streams_per_peer: int = 16


@dataclass
class GossipSection:
    heartbeat_s: float = 1.0
    publish_interval_ms: int = 25
    max_messages_per_second: int = 100
    max_offers: int = 10_000
    max_offers_per_seller: int = 64
    sync_interval_s: float = 30.0
    families: list[str] = field(default_factory=list)


@dataclass
class MetricsSection:
    prometheus: bool = False
    port: int = 0


@dataclass
class WorkersSection:
    device: str = "auto"


@dataclass
class TaskSection:
    name: str = ""
    orgs: int = 1
    index: int = 0
    split: str = "iid"
    deduction: float = 1.0
    seed: int = 0
    align: bool = True


@dataclass
class TransferSection:
    chunk_size: int = 4 * 1024 * 1024
    max_chunk_attempts: int = 3
    deal_ttl_s: float = 600.0


@dataclass
class MarketSection:
    pricing: str = "nash"
    share: float = 0.5
    reserve_fraction: float = 1.0
    credit_limit: int = 1_000_000
    budget: int = 1_000_000
    min_gain: float = 0.0


@dataclass
class AgentSection:
    enabled: bool = False
    round_s: float = 60.0
    model: str = "model"
    # Selling.
    sell: bool = True
    offer_start_round: int = 0
    offer_every: int = 1
    offer_on_improvement: bool = False
    offer_tensors: list[str] = field(default_factory=list)
    offer_expires_s: float = 3600.0
    ask_policy: str = "fixed"
    price: int = 20
    min_price: int = 1
    max_price: int = 1_000_000
    cost_per_mib: float = 100.0
    margin: float = 0.2
    adapt_step: float = 0.2
    terms: str = "delivery"
    max_refusals: int = 0
    competitors: list[str] = field(default_factory=list)
    competitor_policy: str = "premium"
    # Buying.
    buy: bool = True
    trade_start_round: int = 0
    trade_every: int = 1
    value_per_gain: float = 1000.0
    prior_gain: float = 0.05
    round_budget: int = 0
    max_purchases_per_round: int = 0


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    gossip: GossipSection = field(default_factory=GossipSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    task: TaskSection = field(default_factory=TaskSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    market: MarketSection = field(default_factory=MarketSection)
    agent: AgentSection = field(default_factory=AgentSection)


LOG_LEVELS = ("debug", "info", "warning", "error")

# Examples that errors about addresses show.
LISTEN_EXAMPLE = "/ip4/127.0.0.1/tcp/4001"
PEER_EXAMPLE = "/ip4/127.0.0.1/tcp/4001/p2p/<peer ID>"

# Names of the TOML type behind each Python type, for type errors.
TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list of strings",
}

DEFAULT_FILE = """\
# pmarket node configuration. Every key is optional; the values shown are
# the defaults. Command-line options of `pmarket node start` override them.

[node]
# Multiaddrs to listen on. The default accepts connections from this machine
# only; use /ip4/0.0.0.0/tcp/4001 (or a specific address) to join a network.
listen = ["/ip4/127.0.0.1/tcp/0"]
# Peers to connect to at start and to reconnect to, with backoff, when the
# connection drops: full multiaddrs ending in /p2p/<peer ID>.
bootstrap = []
# Find peers on the local network by mDNS. It sends multicast packets.
mdns = false
# debug, info, warning or error. Logs go to node.log in the data directory.
log_level = "info"

[limits]
# Connections to all peers together and to one peer.
max_connections = 128
max_connections_per_peer = 2
# Open libp2p streams in total, and inbound pmarket streams from one peer.
max_streams = 1024
max_inbound_streams_per_peer = 16

[gossip]
# GossipSub heartbeat, in seconds.
heartbeat_s = 1.0
# Minimum time between two offers this node publishes, in milliseconds.
# py-libp2p drops bursts silently, so publishing is paced.
publish_interval_ms = 25
# Messages per second one peer may forward on one topic before GossipSub
# drops them as spam.
max_messages_per_second = 100
# Offer book bounds: offers in all and per seller. When full, the offer
# that expires first is evicted.
max_offers = 10000
max_offers_per_seller = 64
# Seconds between catch-up pulls of a random peer's offer book (besides the
# pull on every new connection).
sync_interval_s = 30.0
# Model families (hex) whose topics this node joins besides the topic of all
# families. Families of local models are joined automatically.
families = []

[metrics]
# Serve Prometheus metrics on 127.0.0.1. Port 0 picks a free port, which
# `pmarket status` shows.
prometheus = false
port = 0

[workers]
# Device for evaluation and merging: "auto" (every CUDA GPU, else the CPU),
# "cpu", "cuda" or "cuda:N".
device = "auto"

[task]
# The task whose data this node trains and evaluates on, for example
# "digits" (built in). Empty: the node evaluates nothing and buys weights
# outright. For the built-in digits task, the node holds shard `index` of
# `orgs` shards cut by `split` ("iid" or "complementary"; `deduction` is the
# fraction of other organizations' classes a complementary shard keeps)
# from the data shuffled with `seed`.
name = ""
orgs = 1
index = 0
split = "iid"
deduction = 1.0
seed = 0
# Align hidden units of bought weights to the local model (weight matching)
# before merging, where the task defines how.
align = true

[transfer]
# Chunk size of the manifests of this node's offers, in bytes.
chunk_size = 4194304
# Fetches of a chunk that fails its hash before the deal fails.
max_chunk_attempts = 3
# Seconds a deal has from the first bid until the weights are delivered.
deal_ttl_s = 600.0

[market]
# How this node prices its offers when a buyer bids: "fixed" sells at the
# ask; "nash" splits the surplus between the reserve and the buyer's bid
# (its value), giving this node `share` of it, never above the ask.
pricing = "nash"
share = 0.5
# Reserve (the least this node sells for) as a fraction of the ask, unless
# `pmarket offer publish --reserve` sets it.
reserve_fraction = 1.0
# Most one buyer may owe this node: its unpaid balance plus the prices of
# sales delivered or in flight but not yet settled.
credit_limit = 1000000
# Most this node spends in all, over its whole ledger.
budget = 1000000
# Merge bought weights only when the relative drop in validation loss is
# above this (0.0 merges any improvement).
min_gain = 0.0

[agent]
# The market agent trains this node's model and trades it round by round.
# With enabled = true the node runs a round every round_s seconds on its
# own; a devnet drives the rounds instead. The model is created from the
# [task] section if it does not exist yet.
enabled = false
round_s = 60.0
model = "model"

# Selling: publish an offer for the current model from round
# offer_start_round on, every offer_every rounds, or only after rounds in
# which the model improved. offer_tensors limits offers to tensors matching
# these patterns (empty: the whole model).
sell = true
offer_start_round = 0
offer_every = 1
offer_on_improvement = false
offer_tensors = []
offer_expires_s = 3600.0
# Ask price: "fixed" (price), "cost" (MiB offered * cost_per_mib * (1 +
# margin)) or "adaptive" (up by adapt_step after a round with sales, down
# after one without, within min_price and max_price).
ask_policy = "fixed"
price = 20
min_price = 1
max_price = 1000000
cost_per_mib = 100.0
margin = 0.2
adapt_step = 0.2
# Payment terms of offers: "delivery", or "gain:MIN" to be paid only when
# the buyer's measured gain reaches MIN.
terms = "delivery"
# Stop selling to a buyer after this many refused payments (0: never stop).
max_refusals = 0
# Peer IDs of competing organizations. "premium" adds the buyer's expected
# gain, valued at this node's value_per_gain, to ask and reserve; "refuse"
# does not sell to them.
competitors = []
competitor_policy = "premium"

# Buying: trade from round trade_start_round on, every trade_every rounds.
# An offer is worth (expected relative gain) * value_per_gain; the expected
# gain starts from the seller's claimed validation loss (or prior_gain) and
# moves to the gains measured on earlier purchases from that seller.
buy = true
trade_start_round = 0
trade_every = 1
value_per_gain = 1000.0
prior_gain = 0.05
# Most spent per round (0: only the [market] budget limits spending) and
# most purchases per round (0: no limit).
round_budget = 0
max_purchases_per_round = 0
"""


def set_task(path: Path, *, name: str, index: int, orgs: int, split: str, deduction: float, seed: int) -> None:
    """Rewrite the [task] values of a config file written by `pmarket init`, keeping its comments."""
    text = path.read_text(encoding="utf-8")
    values = {
        "name": f'"{name}"',
        "orgs": str(orgs),
        "index": str(index),
        "split": f'"{split}"',
        "deduction": repr(float(deduction)),
        "seed": str(seed),
    }
    start = text.index("[task]")
    end = text.find("\n[", start + 1)
    section = text[start:end if end != -1 else len(text)]
    for key, value in values.items():
        section = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", section, count=1)
    path.write_text(text[:start] + section + (text[end:] if end != -1 else ""), encoding="utf-8")
    parse(path.read_text(encoding="utf-8"), str(path))


def _did_you_mean(word: str, choices: list[str], template: str) -> str:
    """Return " (did you mean X?)" for the choice closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {template.format(close[0])}?)" if close else ""


def _section(cls: type[Any], name: str, values: Any, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {type(values).__name__}")
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(known))
    if unknown:
        hint = _did_you_mean(unknown[0], known, "{}")
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r} in [{name}]{hint}; known keys are {', '.join(known)}"
        )
    defaults = cls()
    result: dict[str, Any] = {}
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not expected or (expected is list and not all(isinstance(item, str) for item in value)):
            raise ConfigError(f"{source}: [{name}] {key} must be {TYPE_NAMES[expected]}, got {value!r}")
        result[key] = value
    return dataclasses.replace(defaults, **result)


def parse(text: str, source: str = "config") -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(document) - set(sections))
    if unknown:
        hint = _did_you_mean(unknown[0], list(sections), "[{}]")
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]{hint}; known sections are {', '.join(sections)}"
        )
    section_types: dict[str, type[Any]] = {
        "node": NodeSection,
        "limits": LimitsSection,
        "gossip": GossipSection,
        "metrics": MetricsSection,
        "workers": WorkersSection,
        "task": TaskSection,
        "transfer": TransferSection,
        "market": MarketSection,
        "agent": AgentSection,
    }
    kwargs = {name: _section(section_types[name], name, document.get(name, {}), source) for name in sections}
    config = Config(**kwargs)
    validate(config, source)
    return config


def load(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse(text, str(path))


def validate(config: Config, source: str = "config") -> None:
    """Check values that a type alone does not pin down."""
    for address in config.node.listen:
        check_multiaddr(address, f"{source}: [node] listen address")
    for address in config.node.bootstrap:
        check_peer_address(address, f"{source}: [node] bootstrap address")
    if config.node.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: [node] log_level {config.node.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
    positive = {
        "[limits] max_connections": config.limits.max_connections,
        "[limits] max_connections_per_peer": config.limits.max_connections_per_peer,
        "[limits] max_streams": config.limits.max_streams,
        "[limits] max_inbound_streams_per_peer": config.limits.max_inbound_streams_per_peer,
        "[gossip] heartbeat_s": config.gossip.heartbeat_s,
        "[gossip] max_messages_per_second": config.gossip.max_messages_per_second,
        "[gossip] max_offers": config.gossip.max_offers,
        "[gossip] max_offers_per_seller": config.gossip.max_offers_per_seller,
        "[gossip] sync_interval_s": config.gossip.sync_interval_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: {name} must be positive, got {value}")
    if config.gossip.publish_interval_ms < 0:
        raise ConfigError(f"{source}: [gossip] publish_interval_ms must be 0 or more")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"{source}: [metrics] port {config.metrics.port} is not a TCP port")
    for family in config.gossip.families:
        try:
            if len(bytes.fromhex(family)) != 32:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{source}: [gossip] families entry {family!r} is not 64 hex digits") from None
    validate_task(config.task, source)
    from protocol import limits as protocol_limits

    if not protocol_limits.MIN_CHUNK_SIZE <= config.transfer.chunk_size <= protocol_limits.MAX_CHUNK_SIZE:
        raise ConfigError(
            f"{source}: [transfer] chunk_size {config.transfer.chunk_size} must be in "
            f"[{protocol_limits.MIN_CHUNK_SIZE}, {protocol_limits.MAX_CHUNK_SIZE}]"
        )
    if config.transfer.max_chunk_attempts < 1:
        raise ConfigError(f"{source}: [transfer] max_chunk_attempts must be at least 1")
    if not 10 <= config.transfer.deal_ttl_s <= protocol_limits.MAX_DEAL_LIFETIME_MS / 1000:
        raise ConfigError(f"{source}: [transfer] deal_ttl_s must be between 10 and {protocol_limits.MAX_DEAL_LIFETIME_MS // 1000}")
    market = config.market
    if market.pricing not in ("fixed", "nash"):
        raise ConfigError(f"{source}: [market] pricing {market.pricing!r} must be fixed or nash")
    if not 0 <= market.share <= 1 or not 0 <= market.reserve_fraction <= 1:
        raise ConfigError(f"{source}: [market] share and reserve_fraction must be in [0, 1]")
    if market.credit_limit < 0 or market.budget < 0:
        raise ConfigError(f"{source}: [market] credit_limit and budget must not be negative")
    agent = config.agent
    if agent.ask_policy not in ("fixed", "cost", "adaptive"):
        raise ConfigError(f"{source}: [agent] ask_policy {agent.ask_policy!r} must be fixed, cost or adaptive")
    if agent.competitor_policy not in ("premium", "refuse"):
        raise ConfigError(f"{source}: [agent] competitor_policy {agent.competitor_policy!r} must be premium or refuse")
    if agent.offer_every < 1 or agent.trade_every < 1:
        raise ConfigError(f"{source}: [agent] offer_every and trade_every must be at least 1")
    if agent.round_s <= 0 or agent.value_per_gain < 0 or agent.prior_gain < 0:
        raise ConfigError(f"{source}: [agent] round_s must be positive, value_per_gain and prior_gain not negative")
    if not 0 < agent.min_price <= agent.max_price:
        raise ConfigError(f"{source}: [agent] min_price must be positive and at most max_price")
    device = config.workers.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{source}: [workers] device {device!r} must be auto, cpu, cuda or cuda:N")


def validate_task(task: TaskSection, source: str = "config") -> None:
    """Check the [task] section, including that the task and its split are registered."""
    if task.orgs < 1:
        raise ConfigError(f"{source}: [task] orgs {task.orgs} must be at least 1")
    if not 0 <= task.index < task.orgs:
        raise ConfigError(f"{source}: [task] index {task.index} must be in 0..{task.orgs - 1} (orgs = {task.orgs})")
    if not 0 < task.deduction <= 1:
        raise ConfigError(f"{source}: [task] deduction {task.deduction} must be greater than 0 and at most 1")
    if not task.name:
        return
    from node.tasks import task_names, task_splits

    names = task_names()
    if task.name not in names:
        raise ConfigError(
            f"{source}: [task] name {task.name!r} is not a known task; known tasks: {', '.join(names)} "
            '(name = "" makes a node without a task)'
        )
    splits = task_splits(task.name)
    if splits and task.split not in splits:
        raise ConfigError(
            f"{source}: [task] split {task.split!r} is not a split of task {task.name}; use one of {', '.join(splits)}"
        )


def address_example(text: str, example: str) -> str:
    """Return ``example``, or the multiaddr form of ``text`` when it is written as IPv4:port."""
    match = re.fullmatch(r"\s*(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})\s*", text)
    if match is None:
        return example
    return example.replace("127.0.0.1", match.group(1)).replace("4001", match.group(2))


def check_multiaddr(text: str, what: str, *, example: str = LISTEN_EXAMPLE) -> multiaddr.Multiaddr:
    """Parse ``text`` as a multiaddr; ``what`` names the value in the error, for example "--listen"."""
    try:
        parsed = multiaddr.Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several unrelated types
        # Its messages repeat the whole address around the reason; keep the reason.
        reason = re.sub(r"^Invalid MultiAddr .*?: | \(string: .*\)$", "", str(exc))
        raise ConfigError(
            f"{what} {text!r} is not a valid multiaddr ({reason}); write it as {address_example(text, example)}"
        ) from None
    if not parsed.protocols():
        raise ConfigError(f"{what} is empty; write it as {example}")
    return parsed


def check_peer_address(text: str, what: str) -> multiaddr.Multiaddr:
    """Parse a peer's full address, which must end in /p2p/<peer ID> so the peer can be authenticated."""
    parsed = check_multiaddr(text, what, example=PEER_EXAMPLE)
    if parsed.protocols()[-1].name != "p2p":
        raise ConfigError(
            f"{what} {text!r} must end in /p2p/<peer ID> so the peer can be authenticated, "
            f"for example {text.rstrip('/')}/p2p/12D3KooW...; `pmarket status` on that node shows its full address"
        )
    return parsed
