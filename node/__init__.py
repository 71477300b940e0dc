"""The pmarket daemon: a trio shell around the protocol package."""
