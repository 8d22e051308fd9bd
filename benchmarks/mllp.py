"""The MLLP listener under load: persist before ACK on SQLite (synchronous=FULL), against parsing in the same run.

    .venv/bin/python -m benchmarks.mllp [--seconds 6] [--levels 1,10,50] [--json]

The listener (`schoolslink mllp listen`) runs in its own process on a fresh SQLite store; the senders run in another
process (one connection each, stop-and-wait: send a message, wait for its ACK, send the next) at 1, 10 and 50
concurrent senders, each level for --seconds. The senders are benchmarks/mllp_load.c, compiled here with the
machine's C compiler (an epoll loop: about 9 us of CPU per message, most of it the kernel's TCP, so the listener has
this 2-core machine nearly to itself, as it would with its senders on other machines); then 50 senders again from
Python (asyncio on uvloop: 13-16 us per message), last, on a store by then some 200,000 rows bigger. Without a C
compiler (or if it fails), every level uses the Python senders; --python-senders does that too. An ACK counts as AA
only when its MSA gives AA for the control id just sent; one naming another message, or a connection the listener
closed, fails the run (exit status 1), as does an AA'd message missing from the store. Every message is a distinct
ADT^A08 (its own MSH-10, a valid test NHS number), so every one is checked, sealed, committed and acknowledged.
Reported per level: messages per second, p50 and p99 ACK latency, messages per commit (group commit), CPU per
message of the listener (its event loop's process plus its writer process) and of the senders.

Beside it, in the same run and on the same message: parse throughput of hl7apy (`parse_message`, TOLERANT) and of
python-hl7 (`hl7.parse`), fastcheck's throughput, the hl7apy path of the same checks (reference_check.py), and the
cost of sealing one message, and a 4 KiB write + fdatasync where the store lives (before and after: the floor under
a commit, and with stop-and-wait senders a bound of senders / fsync time). Listener figures are also given as ratios
over those parse rates (how many messages the listener takes, checked and durably stored, in the time hl7apy or
python-hl7 would take to parse one). About 40 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from connectors.hl7v2.mllp import END, START, FrameDecoder

LEVELS = (1, 10, 50)
TEMPLATE = ("MSH|^~\\&|PAS|RX1|SCHOOLSLINK|SL|20261126120000||ADT^A08^ADT_A01|%s|P|2.4\r"
            "EVN|A08|20261126120000\r"
            "PID|1||%s^^^NHS^NH~RX1-%s^^^RX1^MR||TESTPATIENT^BENCH^J||20120301|F|||1 TEST STREET^^TESTTOWN^^ZZ99 9ZZ"
            "||||||||||||||||||NSTS01\r"
            "PD1|||TEST PRACTICE^^Y99999\r"
            "PV1|1|O|CAMHS^^^RX1||||C1234567^DOCTOR^TEST|||||||||||OP|V000123\r"
            "ZU1|local extension|kept\r")


def _test_numbers(n: int = 1000) -> list[str]:
    """The first `n` valid NHS numbers of the 999 test range: the senders cycle through them."""
    from schoolslink.identifiers import make_test_nhs_number

    return [make_test_nhs_number(i) for i in range(n)]


def sample_message(i: int = 0) -> bytes:
    from schoolslink.identifiers import make_test_nhs_number

    return (TEMPLATE % (f"BENCH{i:08d}", make_test_nhs_number(i % 900_000), i)).encode()


# -- the sender process -------------------------------------------------------------------------------------------


class _Sender(asyncio.Protocol):
    """One stop-and-wait connection: send, wait for the ACK, send the next, until the deadline."""

    def __init__(self, prefix: str, nhs: list[str], deadline: float, out: dict[str, Any], done: asyncio.Future[None]):
        self.prefix = prefix
        self.nhs = nhs
        self.deadline = deadline
        self.out = out
        self.done = done
        self.decoder = FrameDecoder()
        self.n = 0
        self.t0 = 0.0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.n += 1
        cid = f"{self.prefix}{self.n}"
        msg = TEMPLATE % (cid, self.nhs[self.n % len(self.nhs)], self.n)
        self.t0 = time.perf_counter()
        self.transport.write(START + msg.encode() + END)

    def data_received(self, data: bytes) -> None:
        for ack in self.decoder.feed(data):
            now = time.perf_counter()
            assert isinstance(ack, bytes)
            self.out["lat"].append(now - self.t0)
            cid = f"{self.prefix}{self.n}".encode()
            msa = ack.find(b"\rMSA|")
            fields = ack[msa + 5:].split(b"\r", 1)[0].split(b"|") if msa >= 0 else []
            if len(fields) < 2 or fields[1] != cid:
                self.out["mismatched"] += 1
            elif fields[0] == b"AA":
                self.out["aa"].append(cid.decode())
            else:
                self.out["other"] += 1
            if now < self.deadline:
                self._send()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.deadline:
            self.out["closed"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def _senders(port: int, n: int, seconds: float, tag: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    nhs = _test_numbers()
    out: dict[str, Any] = {"lat": [], "aa": [], "other": 0, "mismatched": 0, "closed": 0}
    t0 = time.perf_counter()
    deadline = t0 + seconds
    dones = []
    for k in range(n):
        done: asyncio.Future[None] = loop.create_future()

        def factory(k: int = k, done: asyncio.Future[None] = done) -> _Sender:
            return _Sender(f"{tag}-{k}-", nhs, deadline, out, done)

        await loop.create_connection(factory, "127.0.0.1", port)
        dones.append(done)
    await asyncio.gather(*dones)
    wall = time.perf_counter() - t0
    lat = sorted(out["lat"])
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {"senders": n, "messages": len(lat), "seconds": round(wall, 3), "per_s": round(len(lat) / wall),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3) if lat else None,
            "not_aa": out["other"], "mismatched": out["mismatched"], "closed": out["closed"], "aa_ids": out["aa"],
            "sender_cpu_us_per_msg": round((cpu.ru_utime + cpu.ru_stime) / max(1, len(lat)) * 1e6, 1)}


def client_main(port: int, n: int, seconds: float, tag: str, out: str) -> None:
    try:
        import uvloop
        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        res = runner.run(_senders(port, n, seconds, tag))
    # to a file, not stdout: the result holds every acknowledged id (megabytes), and a pipe the event loop left
    # non-blocking once cut such a document short
    Path(out).write_text(json.dumps(res))


# -- the same-run baselines ---------------------------------------------------------------------------------------


def _rate(fn: Any, arg: Any, seconds: float = 1.0, min_n: int = 3) -> float:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn(arg)
        n += 1
        t = time.perf_counter() - t0
        if t >= seconds and n >= min_n:
            return n / t


def fsync_ms(folder: Path, n: int = 100) -> float:
    """Median time of a 4 KiB write + fdatasync in `folder`: what one durable commit costs at least, here and now."""
    path = folder / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"\0" * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return round(sorted(times)[n // 2] * 1000, 3)


def baselines(msg: bytes) -> dict[str, Any]:
    import hl7
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    from connectors.hl7v2.fastcheck import check
    from connectors.hl7v2.reference_check import reference_check
    from connectors.hl7v2.store import MessageSealer

    text = msg.decode()
    sealer = MessageSealer(secrets.token_bytes(32))
    out = {
        "hl7apy_parse_per_s": _rate(lambda m: parse_message(m, find_groups=False,
                                                           validation_level=VALIDATION_LEVEL.TOLERANT), text, 1.5),
        "python_hl7_parse_per_s": _rate(hl7.parse, text),
        "fastcheck_per_s": _rate(check, msg),
        "reference_check_hl7apy_per_s": _rate(reference_check, msg, 1.0),
        "seal_per_s": _rate(lambda m: sealer.seal(m, "PAS^RX1", "BENCH1"), msg),
    }
    res: dict[str, Any] = {k: round(v) for k, v in out.items()}
    res["fastcheck_us"] = round(1e6 / out["fastcheck_per_s"], 2)
    res["seal_us"] = round(1e6 / out["seal_per_s"], 2)
    res["fastcheck_x_hl7apy"] = round(out["fastcheck_per_s"] / out["hl7apy_parse_per_s"])
    res["fastcheck_x_python_hl7"] = round(out["fastcheck_per_s"] / out["python_hl7_parse_per_s"], 1)
    res["message_bytes"] = len(msg)
    return res


# -- the run --------------------------------------------------------------------------------------------------------


def _cpu(proc: psutil.Process) -> tuple[float, float, float, float]:
    """(user, system) CPU seconds of the listener's own process, then of its children (the writer process)."""
    t = proc.cpu_times()
    kids = [c.cpu_times() for c in proc.children(recursive=True)]
    return t.user, t.system, sum(k.user for k in kids), sum(k.system for k in kids)


def load_generator(folder: Path) -> Path | None:
    """benchmarks/mllp_load.c compiled into `folder`, or None when this machine has no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = folder / "mllp_load"
    done = subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_name("mllp_load.c"))],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"benchmarks/mllp_load.c did not compile ({cc}): the Python senders run every level\n{done.stderr}",
              file=sys.stderr)
        return None
    return exe


def _c_senders(exe: Path, folder: Path, port: int, n: int, seconds: float, tag: str) -> dict[str, Any]:
    messages = folder / "messages.bin"
    if not messages.exists():  # the template, NUL, then the NHS numbers back to back (a test may have written it)
        messages.write_bytes(TEMPLATE.encode() + b"\0" + "".join(_test_numbers()).encode())
    result, acked = folder / f"{tag}.json", folder / f"{tag}.acked"
    done = subprocess.run([str(exe), str(port), str(n), str(seconds), tag, str(messages), str(result), str(acked)],
                          stdin=subprocess.DEVNULL)
    if done.returncode not in (0, 1) or not result.exists():  # 1: mismatched ACKs or closed connections, counted
        raise RuntimeError(f"the load generator failed (exit status {done.returncode})")
    res: dict[str, Any] = json.loads(result.read_text())
    res["aa_ids"] = acked.read_text().split()
    res["load_generator"] = "C (benchmarks/mllp_load.c)"
    return res


def _python_senders(folder: Path, env: dict[str, str], port: int, n: int, seconds: float,
                    tag: str) -> dict[str, Any]:
    result = folder / f"{tag}.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.mllp", "--client", "--port", str(port), "--senders", str(n),
         "--seconds", str(seconds), "--tag", tag, "--out", str(result)],
        stdin=subprocess.DEVNULL, check=True, env=env, cwd=Path(__file__).parents[1])
    res: dict[str, Any] = json.loads(result.read_text())
    res["load_generator"] = "Python (asyncio on uvloop)"
    return res


def run(levels: tuple[int, ...], seconds: float, *, python_senders: bool = False) -> dict[str, Any]:
    from connectors.hl7v2.listener import ListenerProcess

    out: dict[str, Any] = {"levels": {}, "store": "sqlite (WAL, synchronous=FULL)", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="sl-bench-mllp-") as tmp:
        home = Path(tmp) / "home"
        env = {"SCHOOLSLINK_HOME": str(home), "SCHOOLSLINK_SEAL_KEY": secrets.token_hex(32),
               "SCHOOLSLINK_KEY": "bench-key-not-secret"}
        child_env = {k: v for k, v in os.environ.items() if k != "SCHOOLSLINK_DB_URL"} | env
        home.mkdir(parents=True)
        exe = None if python_senders else load_generator(Path(tmp))
        # (label, senders, C?): every level, then the top one again from Python, for comparison
        runs = [(str(n), n, exe is not None) for n in levels]
        if exe is not None and levels:
            runs.append((f"{max(levels)}-python", max(levels), False))
        out["fsync_ms_before"] = fsync_ms(home)
        with ListenerProcess(env=env, log_path=Path(tmp) / "listener.log",
                             args=["--db-url", f"sqlite:///{home / 'state.db'}"]) as listener:
            acked: set[str] = set()
            proc = psutil.Process(listener.pid)
            for i, (label, n, in_c) in enumerate(runs):
                cpu0 = _cpu(proc)
                tag = f"L{i}"
                if in_c:
                    assert exe is not None
                    res = _c_senders(exe, Path(tmp), listener.port, n, seconds, tag)
                else:
                    res = _python_senders(Path(tmp), child_env, listener.port, n, seconds, tag)
                res["tag"] = tag
                cpu1 = _cpu(proc)
                acked.update(res.pop("aa_ids"))
                per = 1e6 / max(1, res["messages"])
                loop_s = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
                writer_s = (cpu1[2] - cpu0[2]) + (cpu1[3] - cpu0[3])
                res["listener_cpu_us_per_msg"] = round((loop_s + writer_s) * per, 1)  # both processes
                res["listener_loop_cpu_us_per_msg"] = round(loop_s * per, 1)
                res["listener_writer_cpu_us_per_msg"] = round(writer_s * per, 1)
                res["listener_cpu_user_sys_s"] = [round(cpu1[0] - cpu0[0] + cpu1[2] - cpu0[2], 2),
                                                  round(cpu1[1] - cpu0[1] + cpu1[3] - cpu0[3], 2)]
                out["levels"][label] = res
            listener.terminate()
        out["fsync_ms_after"] = fsync_ms(home)
        db = sqlite3.connect(home / "state.db")
        stored = {r[0] for r in db.execute("SELECT control_id FROM hl7_messages")}
        for fig in out["levels"].values():  # each commit stamps its messages with one received_at
            commits = db.execute("SELECT count(DISTINCT received_at) FROM hl7_messages WHERE control_id LIKE ?",
                                 (f"{fig['tag']}-%",)).fetchone()[0]
            fig["messages_per_commit"] = round(fig["messages"] / max(1, commits), 1)
        db.close()
        out["acked_aa"] = len(acked)
        out["stored"] = len(stored)
        out["acked_not_stored"] = len(acked - stored)
        log = (Path(tmp) / "listener.log").read_text(errors="replace")
        m = re.search(r"(\d+) messages stored in (\d+) commits", log)
        if m:
            out["commits"] = int(m.group(2))
            out["mean_messages_per_commit"] = round(int(m.group(1)) / max(1, int(m.group(2))), 1)
    out["baselines"] = base = baselines(sample_message(1))
    fsync = max(out["fsync_ms_before"], out["fsync_ms_after"])
    for fig in out["levels"].values():
        # stop-and-wait: each sender has one message in flight, so no more than this many can be committed a second
        fig["fsync_bound_per_s"] = round(fig["senders"] / (fsync / 1000))
        fig["x_hl7apy_parse"] = round(fig["per_s"] / base["hl7apy_parse_per_s"], 1)
        fig["x_python_hl7_parse"] = round(fig["per_s"] / base["python_hl7_parse_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0, help="how long each level runs (default 6)")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent senders per level (1,10,50)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--python-senders", action="store_true", help="every level from the Python senders, not the C ones")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the sender process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--senders", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="B", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client_main(args.port, args.senders, args.seconds, args.tag, args.out)
        return 0
    out = run(tuple(int(x) for x in args.levels.split(",")), args.seconds, python_senders=args.python_senders)
    if args.json:
        print(json.dumps(out))
        return 0 if _sound(out) else 1
    b = out["baselines"]
    print(f"MLLP listener, persist before ACK ({out['store']}), {out['cpus']} CPUs, {b['message_bytes']}-byte ADT^A08; "
          "senders from benchmarks/mllp_load.c (C) or asyncio (Python)")
    for fig in out["levels"].values():
        gen = fig["load_generator"].split()[0]
        print(f"  {fig['senders']:>3} {gen:<6} senders: {round(fig['per_s']):>7,d} msg/s  p50 {fig['p50_ms']:.2f} ms"
              f"  p99 {fig['p99_ms']:.2f} ms  ({fig['messages']} in {fig['seconds']} s; "
              f"x{fig['x_hl7apy_parse']} hl7apy parse, "
              f"x{fig['x_python_hl7_parse']} python-hl7 parse)")
    print(f"  acknowledged AA {out['acked_aa']}, stored {out['stored']}, acknowledged but not stored "
          f"{out['acked_not_stored']}; messages per commit: " + ", ".join(
              f"{n}: {fig['messages_per_commit']}" for n, fig in out["levels"].items()))
    print("  listener CPU per message (us; event loop + writer process): " + ", ".join(
        f"{n}: {fig['listener_cpu_us_per_msg']} ({fig['listener_loop_cpu_us_per_msg']} + "
        f"{fig['listener_writer_cpu_us_per_msg']})" for n, fig in out["levels"].items())
        + "; senders' CPU per message (us): " + ", ".join(
        f"{n}: {fig['sender_cpu_us_per_msg']}" for n, fig in out["levels"].items()))
    print(f"  4 KiB write+fdatasync here: {out['fsync_ms_before']} ms before, {out['fsync_ms_after']} ms after "
          f"(stop-and-wait bound: senders / fsync time)")
    print(f"  same run: hl7apy parse {b['hl7apy_parse_per_s']:,d}/s, "
          f"python-hl7 parse {b['python_hl7_parse_per_s']:,d}/s, fastcheck {b['fastcheck_per_s']:,d}/s "
          f"({b['fastcheck_us']} us; x{b['fastcheck_x_hl7apy']} hl7apy, "
          f"x{b['fastcheck_x_python_hl7']} python-hl7), reference_check {b['reference_check_hl7apy_per_s']:,d}/s, "
          f"seal {b['seal_us']} us")
    bad = {k: (f["mismatched"], f["closed"]) for k, f in out["levels"].items() if f["mismatched"] or f["closed"]}
    if bad:
        print(f"  FAILED: ACKs naming another message, or connections the listener closed, per level: {bad}")
    return 0 if _sound(out) else 1


def _sound(out: dict[str, Any]) -> bool:
    """Every AA'd message stored, every ACK for the message sent, no connection closed by the listener."""
    return out["acked_not_stored"] == 0 and not any(f["mismatched"] or f["closed"] for f in out["levels"].values())


if __name__ == "__main__":
    sys.exit(main())
