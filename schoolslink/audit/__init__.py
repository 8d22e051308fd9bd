"""Auditor tools over the disclosure ledger: who received what about whom, when, under which consent and agreement.

- `query`: ledger entries by subject (an NHS number or UPN, keyed the way the pipeline keys it), recipient,
  agreement, run and time range, as CSV or JSON.
- `report`: one run's self-contained accessible HTML report (counts and reasons only, no pupil data).
- `auditevent`: FHIR R4 AuditEvent per ledger entry, as a batch Bundle file or PUT to a trust's FHIR server.
- `commands`: the `schoolslink audit query | report | export-fhir` subcommands.

The ledger is read by reflecting its table, so columns added later (task_id, key_version, ...) show up
without a change here. Nothing here writes to the state store.
"""
