"""The school portal: tonight's feed on the web for a school's DSL and SMHL, and nobody else (docs/portal.md)."""
