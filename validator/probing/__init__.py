"""Stage 1: what the validator asks and how it is sent. probes.py derives each host's
probes from the secret (prompt banks, settings mixes); client.py sends them through the
network's API and records every outcome, failures classified, never raised."""
