"""Local networks of real pmarket node processes and the trading experiment."""
