"""HL7v2 over MLLP: the listener that stores each message durably before it acknowledges it, and a sender.

| module | what it is for |
|---|---|
| `mllp.py` | MLLP framing; the incremental frame decoder (partial reads, frames per read, noise, 1 MiB limit) |
| `fastcheck.py` | the checks made before the ACK (MSH, message type and event, version, PID-3 NHS number), on bytes |
| `reference_check.py` | the same checks through hl7apy: the differential test's oracle and the benchmark's baseline |
| `ack.py` | the acknowledgment (MSH, MSA, ERR) in the original message's encoding characters |
| `store.py` | the durable message store (`hl7_messages`): sealed bodies, group commit, duplicates, the full-parse API |
| `listener.py` | the asyncio MLLP server (optional TLS): check, store, then ACK, in order per connection |
| `sender.py` | the client: files of messages, one connection, ACK timeout, retry with the same control id |
| `parse.py` | after the ACK: the full hl7apy parse of a stored message (schoolslink/pipeline/hl7_apply.py) |

docs/mllp.md says how to run the listener and the sender and what an ACK guarantees; docs/hl7v2.md what happens after.
"""
