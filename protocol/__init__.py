"""The pmarket wire protocol, sans-IO.

Everything here is pure: functions and state machines that take bytes or
decoded messages plus the current time and return messages, events and bytes.
Nothing in this package imports trio, torch or sockets, or touches files, so
every rule can be tested without a network.
"""
