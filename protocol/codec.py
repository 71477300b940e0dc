"""Canonical msgpack encoding and strict decoding of protocol messages.

Every message is one msgpack array: ``[type, version, field_1, ..., field_n]``
with the fields in the order their dataclass declares them. Structs nested in
a message (deal terms in a bid, say) are arrays of their fields with no type
or version of their own. There are no maps and no floats: money is an integer
count of the smallest unit, times are integer milliseconds since the Unix
epoch, and ratios are integer parts per million.

An encoding is canonical when it is exactly what `encode` produces: the
shortest msgpack form of every integer, string, byte string and array header,
strings as msgpack str (valid UTF-8) and byte strings as msgpack bin. The
decoder accepts only canonical bytes, so every message has one encoding and
signatures and hashes over encodings are well defined.

Anything a peer sends either decodes to a message or raises
`RemoteProtocolError`; no other exception leaves `decode`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import msgpack

from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class Kind:
    """How one field looks on the wire and which values it admits.

    `accepts`, when set, is a fast predicate: true only for wire values that
    are valid and need no conversion. Decoding tries it first and sends every
    other value through `check`, which converts or builds the error.
    """

    accepts: Callable[[Any], bool] | None = None

    def check(self, value: Any, name: str) -> Any:
        """Validate a decoded wire value and return the field's Python value."""
        raise NotImplementedError

    def to_wire(self, value: Any, name: str) -> Any:
        """Validate a Python value before encoding and return its wire form."""
        return self.check(value, name)


def _invalid(name: str, problem: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.INVALID_FIELD, f"field {name!r} {problem}")


class UInt(Kind):
    """An unsigned integer in ``[minimum, maximum]``."""

    def __init__(self, maximum: int = UINT64_MAX, minimum: int = 0) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.accepts = lambda value: type(value) is int and minimum <= value <= maximum

    def check(self, value: Any, name: str) -> int:
        # bool is a subclass of int in Python but a distinct msgpack type.
        if type(value) is not int:
            raise _invalid(name, f"must be an integer, got {type(value).__name__}")
        if not self.minimum <= value <= self.maximum:
            raise _invalid(name, f"is {value}, outside [{self.minimum}, {self.maximum}]")
        return value


class Int(UInt):
    """A signed 64-bit integer in ``[minimum, maximum]``."""

    def __init__(self, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> None:
        super().__init__(maximum=maximum, minimum=minimum)


class Bool(Kind):
    accepts = staticmethod(lambda value: type(value) is bool)

    def check(self, value: Any, name: str) -> bool:
        if type(value) is not bool:
            raise _invalid(name, f"must be a boolean, got {type(value).__name__}")
        return value


class Bytes(Kind):
    """A msgpack bin of at most `max_len` bytes, or exactly one of `sizes`."""

    def __init__(self, max_len: int, sizes: tuple[int, ...] | None = None) -> None:
        self.max_len = max_len
        self.sizes = sizes
        if sizes is None:
            self.accepts = lambda value: type(value) is bytes and len(value) <= max_len
        else:
            self.accepts = lambda value: type(value) is bytes and len(value) in sizes and len(value) <= max_len

    def check(self, value: Any, name: str) -> bytes:
        if type(value) is not bytes:
            raise _invalid(name, f"must be a byte string, got {type(value).__name__}")
        if self.sizes is not None and len(value) not in self.sizes:
            raise _invalid(name, f"has {len(value)} bytes, expected one of {self.sizes}")
        if len(value) > self.max_len:
            raise _invalid(name, f"has {len(value)} bytes, more than the limit {self.max_len}")
        return value


class Str(Kind):
    """A msgpack str of at most `max_bytes` bytes of UTF-8."""

    def __init__(self, max_bytes: int, min_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        # For ASCII text the character count is the UTF-8 byte count.
        self.accepts = lambda value: (
            type(value) is str and min_bytes <= len(value) <= max_bytes and value.isascii()
        )

    def check(self, value: Any, name: str) -> str:
        if type(value) is not str:
            raise _invalid(name, f"must be a string, got {type(value).__name__}")
        # The character count bounds the UTF-8 length from below, so most
        # strings skip the encode.
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            raise _invalid(name, f"has {size} bytes, more than the limit {self.max_bytes}")
        if size < self.min_bytes:
            raise _invalid(name, f"has {size} bytes, fewer than the minimum {self.min_bytes}")
        return value

    def to_wire(self, value: Any, name: str) -> str:
        text = self.check(value, name)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"field {name!r} is not valid UTF-8: {exc}") from None
        return text


E = TypeVar("E", bound=enum.IntEnum)


class Enum(Kind):
    """An integer that must be a member of an `IntEnum`."""

    def __init__(self, enum_type: type[enum.IntEnum]) -> None:
        self.enum_type = enum_type

    def check(self, value: Any, name: str) -> enum.IntEnum:
        if type(value) is not int and not isinstance(value, self.enum_type):
            raise _invalid(name, f"must be an integer, got {type(value).__name__}")
        try:
            return self.enum_type(value)
        except ValueError:
            raise _invalid(name, f"is {value}, not a known {self.enum_type.__name__}") from None

    def to_wire(self, value: Any, name: str) -> int:
        return int(self.check(value, name))


class ListOf(Kind):
    """A msgpack array of at most `max_len` items of one kind, as a tuple."""

    def __init__(self, item: Kind, max_len: int) -> None:
        self.item = item
        self.max_len = max_len

    def check(self, value: Any, name: str) -> tuple[Any, ...]:
        if type(value) is not list and type(value) is not tuple:
            raise _invalid(name, f"must be an array, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _invalid(name, f"has {len(value)} items, more than the limit {self.max_len}")
        check = self.item.check
        try:
            return tuple([check(item, name) for item in value])
        except RemoteProtocolError:
            # Find the offending item again, this time naming its index.
            for i, item in enumerate(value):
                check(item, f"{name}[{i}]")
            raise

    def to_wire(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, (list, tuple)):
            raise LocalProtocolError(f"field {name!r} must be a tuple, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise LocalProtocolError(f"field {name!r} has {len(value)} items, limit {self.max_len}")
        return [self.item.to_wire(item, f"{name}[{i}]") for i, item in enumerate(value)]


class TupleOf(Kind):
    """A fixed-length msgpack array whose positions have their own kinds."""

    def __init__(self, *items: Kind) -> None:
        self.items = items

    def check(self, value: Any, name: str) -> tuple[Any, ...]:
        if type(value) is not list and type(value) is not tuple:
            raise _invalid(name, f"must be an array, got {type(value).__name__}")
        if len(value) != len(self.items):
            raise _invalid(name, f"has {len(value)} items, expected {len(self.items)}")
        return tuple([kind.check(item, name) for kind, item in zip(self.items, value, strict=True)])

    def to_wire(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise LocalProtocolError(f"field {name!r} must be a {len(self.items)}-tuple")
        return [kind.to_wire(item, f"{name}[{i}]") for i, (kind, item) in enumerate(zip(self.items, value, strict=True))]


class Nested(Kind):
    """A struct: a msgpack array of a dataclass's fields in declaration order."""

    def __init__(self, struct: type[Struct]) -> None:
        self.struct = struct

    def check(self, value: Any, name: str) -> Struct:
        if type(value) is not list:
            raise _invalid(name, f"must be an array, got {type(value).__name__}")
        return self.struct._from_wire_fields(value, name)

    def to_wire(self, value: Any, name: str) -> list[Any]:
        if not isinstance(value, self.struct):
            raise LocalProtocolError(f"field {name!r} must be a {self.struct.__name__}")
        return value._wire_fields()


def wire(kind: Kind) -> Any:
    """Declare a dataclass field and how it is encoded."""
    return dataclasses.field(metadata={"kind": kind})


S = TypeVar("S", bound="Struct")


class Struct:
    """Base of every encoded dataclass: field kinds come from `wire(...)`."""

    _SPEC: ClassVar[tuple[tuple[str, Kind], ...]] = ()

    @classmethod
    def _spec(cls) -> tuple[tuple[str, Kind], ...]:
        spec: tuple[tuple[str, Kind], ...] | None = cls.__dict__.get("_SPEC_CACHE")
        if spec is None:
            fields = dataclasses.fields(cls)  # type: ignore[arg-type]
            spec = tuple((f.name, f.metadata["kind"]) for f in fields)
            cls._SPEC_CACHE = spec  # type: ignore[attr-defined]
        return spec

    def _wire_fields(self) -> list[Any]:
        return [kind.to_wire(getattr(self, name), name) for name, kind in self._spec()]

    @classmethod
    def _from_wire_fields(cls: type[S], values: list[Any], context: str) -> S:
        spec = cls._spec()
        if len(values) != len(spec):
            raise RemoteProtocolError(
                Reason.MALFORMED,
                f"{context} has {len(values)} fields, a {cls.__name__} has {len(spec)}",
            )
        # Positional arguments in declaration order: the hot path of every decode.
        args = []
        for (name, kind), value in zip(spec, values, strict=True):
            accepts = kind.accepts
            args.append(value if accepts is not None and accepts(value) else kind.check(value, name))
        return cls(*args)


M = TypeVar("M", bound="Message")


class Message(Struct):
    """A top-level message with a wire type code and a version.

    `SIGNATURES` names trailing fields that hold signatures; the signed body
    of a message is its encoding without them.
    """

    TYPE: ClassVar[int]
    VERSION: ClassVar[int] = 1
    SIGNATURES: ClassVar[tuple[str, ...]] = ()
    MAX_SIZE: ClassVar[int]


_REGISTRY: dict[int, type[Message]] = {}


def register(cls: type[M]) -> type[M]:
    """Class decorator: make `decode` recognise this message type."""
    if cls.TYPE in _REGISTRY:
        raise LocalProtocolError(f"message type {cls.TYPE} registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


def registered_types() -> dict[int, type[Message]]:
    return dict(_REGISTRY)


_packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack(value: Any) -> bytes:
    """Encode a plain value (lists, ints, str, bytes) canonically."""
    return _packb(value)


def encode(message: Message) -> bytes:
    """Encode `message` canonically; raises LocalProtocolError on a bad value."""
    try:
        fields = message._wire_fields()
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc.detail}") from None
    data = _packb([message.TYPE, message.VERSION, *fields])
    if len(data) > message.MAX_SIZE:
        raise LocalProtocolError(
            f"{type(message).__name__} encodes to {len(data)} bytes, "
            f"more than its limit {message.MAX_SIZE}"
        )
    return data


def encode_body(message: Message) -> bytes:
    """Encode `message` without its signature fields: the bytes that are signed."""
    spec = message._spec()
    count = len(spec) - len(message.SIGNATURES)
    try:
        fields = [kind.to_wire(getattr(message, name), name) for name, kind in spec[:count]]
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc.detail}") from None
    return _packb([message.TYPE, message.VERSION, *fields])


def _unpack(data: bytes, max_size: int) -> Any:
    if len(data) > max_size:
        raise RemoteProtocolError(
            Reason.TOO_LARGE, f"message has {len(data)} bytes, more than the limit {max_size}"
        )
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise RemoteProtocolError(
            Reason.TRAILING_BYTES, f"{len(exc.extra)} bytes follow the message"
        ) from None
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError and others
        raise RemoteProtocolError(Reason.MALFORMED, f"not valid msgpack: {type(exc).__name__}") from None


def _decode(
    data: bytes,
    expected: Sequence[type[Message]] | None,
    max_size: int | None,
) -> tuple[Message, list[Any]]:
    if type(data) is not bytes:
        data = bytes(data)
    if max_size is None:
        candidates = expected if expected is not None else list(_REGISTRY.values())
        max_size = max(cls.MAX_SIZE for cls in candidates)
    raw = _unpack(data, max_size)

    # Header: [type, version, ...].
    if type(raw) is not list or len(raw) < 2:
        raise RemoteProtocolError(Reason.MALFORMED, "a message must be an array [type, version, ...]")
    type_code, version = raw[0], raw[1]
    if type(type_code) is not int or type(version) is not int:
        raise RemoteProtocolError(Reason.MALFORMED, "message type and version must be integers")
    cls = _REGISTRY.get(type_code)
    if cls is None or (expected is not None and cls not in expected):
        names = ", ".join(c.__name__ for c in expected) if expected is not None else "any known type"
        raise RemoteProtocolError(
            Reason.UNKNOWN_TYPE, f"message type {type_code} is not acceptable here (expected {names})"
        )
    if version != cls.VERSION:
        raise RemoteProtocolError(
            Reason.UNSUPPORTED_VERSION,
            f"{cls.__name__} version {version} is not supported (this node speaks {cls.VERSION})",
        )
    if len(data) > cls.MAX_SIZE:
        raise RemoteProtocolError(
            Reason.TOO_LARGE, f"{cls.__name__} has {len(data)} bytes, more than the limit {cls.MAX_SIZE}"
        )

    # Fields, then canonical form: re-encoding must give the same bytes.
    message = cls._from_wire_fields(raw[2:], cls.__name__)
    if _packb(raw) != data:
        raise RemoteProtocolError(Reason.NON_CANONICAL, f"{cls.__name__} is not canonically encoded")
    return message, raw


def decode(
    data: bytes,
    expected: Sequence[type[Message]] | None = None,
    *,
    max_size: int | None = None,
) -> Message:
    """Decode one message from `data`, strictly.

    `expected` restricts which message types are acceptable here (anything
    else is `UNKNOWN_TYPE`). `max_size` defaults to the largest limit of the
    expected types.
    """
    return _decode(data, expected, max_size)[0]


def decode_signed(cls: type[M], data: bytes) -> tuple[M, bytes]:
    """Decode a message of type `cls` and return it with its signed body.

    The body is re-packed from the decoded array without the signature
    fields, which is cheaper than re-encoding the message.
    """
    message, raw = _decode(data, (cls,), None)
    assert isinstance(message, cls)
    return message, _packb(raw[: len(raw) - len(cls.SIGNATURES)])


def decode_as(cls: type[M], data: bytes) -> M:
    """Decode `data`, which must be a message of type `cls`."""
    message = decode(data, (cls,))
    assert isinstance(message, cls)
    return message
