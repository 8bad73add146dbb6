"""Fault injection: bad inputs refused before work starts, faults survived, nothing lost (docs/reliability.md)."""
