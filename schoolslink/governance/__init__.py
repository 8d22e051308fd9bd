"""Governance: agreements, consent, identity matching. Code's input is the agreement; nothing leaves without it."""
