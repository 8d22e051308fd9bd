"""Mappings between the canonical model and what we send. The mappings issue makes these declarative YAML."""
