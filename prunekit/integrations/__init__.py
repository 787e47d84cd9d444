"""Integrations with tools outside prunekit (each imported only by the tool that loads it, never by ``import prunekit``)."""
