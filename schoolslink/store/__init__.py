"""The state store: watermarks, roll hashes, consent register, identity links, outbox, ledger."""
