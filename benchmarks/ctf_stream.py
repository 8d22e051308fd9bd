"""Reading a 200 MB Common Transfer File: constant memory, against parsing the whole tree, in the same run.

    .venv/bin/python -m benchmarks.ctf_stream [--mb 200] [--small-mb 20] [--json]

Writes a synthetic CTF 25 file of about --mb megabytes (fully detailed pupils: SEN history, address,
contacts, attendance years, exclusions), and one of --small-mb, then reads each in a fresh process and
reports time and peak RSS:

- stream: the hardened streaming reader (connectors.mis.ctf) mapping every pupil to a Learner and dropping
  it (what the pipeline's per-school read costs, apart from keeping the roll);
- sealed: the same, reading through the landing zone's decrypting stream (the file sealed first);
- baseline: the obvious approach, `lxml.etree.parse` of the whole file (same safe parser options), then the
  same per-pupil mapping over the tree.

Figures are ratios in the same run: memory of the big file over the small one (flat memory gives ~1.0),
and stream against baseline for time and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEADER = """<?xml version="1.0" encoding="UTF-8"?>
<CTfile>
  <Header>
    <DocumentName>Common Transfer File</DocumentName><CTFversion>25.0</CTFversion>
    <DateTime>2026-11-25T18:00:00</DateTime><DocumentQualifier>full</DocumentQualifier><SupplierID>BENCH</SupplierID>
    <SourceSchool><LEA>999</LEA><Estab>1001</Estab><URN>900001</URN><SchoolName>Benchmark Academy</SchoolName>
      <AcademicYear>2026</AcademicYear></SourceSchool>
  </Header>
  <CTFpupilData>
"""
FOOTER = "  </CTFpupilData>\n</CTfile>\n"
PUPIL = """    <Pupil>
      <UPN>{upn}</UPN><UniqueLearnerNumber>1000102504</UniqueLearnerNumber>
      <Surname>SURNAME{n}</Surname><Forename>Forename{n}</Forename><MiddleNames>J</MiddleNames>
      <PreferredSurname>SURNAME{n}</PreferredSurname><PreferredForename>Fore</PreferredForename>
      <DOB>2012-03-{day:02d}</DOB><Sex>{sex}</Sex>
      <BasicDetails><NCyearActual>9</NCyearActual><Ethnicity>WBRI</Ethnicity><EnrolStatus>C</EnrolStatus>
        <FSMeligible>false</FSMeligible></BasicDetails>
      <LookedAfter><InCare>false</InCare></LookedAfter>
      <SENhistory><SEN><StartDate>2024-09-01</StartDate><SENprovision>K</SENprovision></SEN>
        <SEN><StartDate>2025-09-01</StartDate><SENprovision>N</SENprovision></SEN></SENhistory>
      <Address><BS7666Address><PAON>{n}</PAON><Street>Any Street</Street><Town>Anytown</Town>
        <Postcode>AB1 2CD</Postcode></BS7666Address></Address>
      <Contacts>
        <Contact><Order>1</Order><Surname>SURNAME{n}</Surname><Forename>Pat</Forename>
          <Relationship>PAR</Relationship><Responsibility>true</Responsibility>
          <Phones><Phone><TelephoneType>H</TelephoneType><PhoneNo>01234 567890</PhoneNo></Phone></Phones>
          <Email>parent{n}@example.org</Email></Contact>
        <Contact><Order>2</Order><Surname>OTHER{n}</Surname><Forename>Sam</Forename>
          <Relationship>CAR</Relationship><Responsibility>false</Responsibility></Contact>
      </Contacts>
      <Attendance>
        <YearData><Year>2025</Year><SessionsPossible>380</SessionsPossible><SessionsAuthorised>10</SessionsAuthorised>
          <SessionsUnauthorised>4</SessionsUnauthorised><AttendanceSessions>366</AttendanceSessions></YearData>
        <YearData><Year>2026</Year><SessionsPossible>120</SessionsPossible><SessionsAuthorised>3</SessionsAuthorised>
          <SessionsUnauthorised>1</SessionsUnauthorised><AttendanceSessions>116</AttendanceSessions></YearData>
      </Attendance>
      <Exclusions><Exclusion><Category>FIXD</Category><StartDate>2026-02-01</StartDate></Exclusion></Exclusions>
    </Pupil>
"""


def write_ctf(path: Path, megabytes: float) -> int:
    from schoolslink.identifiers import make_upn

    target = int(megabytes * 1_000_000)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        f.write(HEADER)
        size = len(HEADER)
        while size < target:
            n += 1
            block = PUPIL.format(upn=make_upn(999, 1001 + n // 99_999, n % 99_999 + 1), n=n, day=n % 28 + 1,
                                 sex="MF"[n % 2])
            f.write(block)
            size += len(block)
        f.write(FOOTER)
    return n


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, path: Path) -> dict[str, Any]:
    """Run in a fresh process: read the file one way; pupils, seconds, peak RSS."""
    from connectors.mis.ctf import CtfReader, element_values
    from schoolslink.model import Learner

    t0 = time.perf_counter()
    n = 0
    if mode in ("stream", "sealed"):
        if mode == "sealed":
            from connectors.storage.sealed import open_sealed

            source: Any = open_sealed(path)
        else:
            source = path
        for item in CtfReader().iter_learners(source):
            n += type(item) is Learner
    else:  # baseline: the whole tree, then the same per-pupil mapping
        from lxml import etree

        from schoolslink.mapping.engine import load_mappings

        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)
        tree = etree.parse(str(path), parser)
        cm = load_mappings().compile("ctf-learner")
        ctx = {"school_urn": "900001", "ctf_version": "25.0", "ctf_major": "25", "file_date": "2026-11-25"}
        for el in tree.iter("Pupil"):
            cm.run(element_values(el), ctx)
            n += 1
    return {"mode": mode, "pupils": n, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_peak_mb())}


def _child(mode: str, path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.ctf_stream", "--measure", mode, str(path)],
                         check=True, capture_output=True, text=True, env={**os.environ})
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--small-mb", type=float, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="sl-ctf-bench-") as tmp:
        os.environ.setdefault("SCHOOLSLINK_HOME", str(Path(tmp) / "home"))
        os.environ.setdefault("SCHOOLSLINK_KEY", "benchmark-key")
        big, small = Path(tmp) / "big.xml", Path(tmp) / "small.xml"
        n_big = write_ctf(big, args.mb)
        write_ctf(small, args.small_mb)
        from connectors.storage.sealed import seal_file

        t0 = time.perf_counter()
        sealed = seal_file(big, Path(tmp) / "big.xml.sealed", {"kind": "bench"})
        seal_s = time.perf_counter() - t0
        res: dict[str, Any] = {
            "file_mb": round(big.stat().st_size / 1e6, 1), "pupils": n_big, "seal_seconds": round(seal_s, 2),
            "stream_small": _child("stream", small), "stream": _child("stream", big),
            "sealed": _child("sealed", sealed), "baseline": _child("baseline", big),
        }
    s, b, sm = res["stream"], res["baseline"], res["stream_small"]
    res["ratios"] = {
        "memory_big_over_small_file": round(s["peak_rss_mb"] / sm["peak_rss_mb"], 2),
        "memory_stream_over_baseline": round(s["peak_rss_mb"] / b["peak_rss_mb"], 3),
        "speed_stream_over_baseline": round(b["seconds"] / s["seconds"], 2),
        "sealed_time_over_plain": round(res["sealed"]["seconds"] / s["seconds"], 2),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"CTF {res['file_mb']} MB, {n_big} pupils (sealing it took {res['seal_seconds']} s)")
        for k in ("stream_small", "stream", "sealed", "baseline"):
            r = res[k]
            print(f"  {k:13s} {r['pupils']:>8d} pupils  {r['seconds']:>7.2f} s  "
                  f"{r['pupils'] / max(r['seconds'], 1e-9):>9.0f} pupils/s  peak RSS {r['peak_rss_mb']:>6.0f} MB")
        for k, v in res["ratios"].items():
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
