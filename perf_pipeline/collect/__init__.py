"""Collecting metrics where they are made: the pytest plugin, the node agent, and what they
share (run metadata from the CI's environment, pushing to the gateway)."""
