"""Runs `schoolslink demo` at a size, sampling the whole process tree's memory, beside a same-run baseline."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]


class TreeSampler(threading.Thread):
    """Peak RSS of a process tree, split into the pipeline and the Node FHIR peer."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_pipeline = 0
        self.peak_peer = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pipeline = peer = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if p.name().startswith("node"):
                        peer += rss
                    else:
                        pipeline += rss
                except psutil.NoSuchProcess:
                    continue
            self.peak_pipeline = max(self.peak_pipeline, pipeline)
            self.peak_peer = max(self.peak_peer, peer)
            time.sleep(self.interval)


def baseline_observations_per_second(n: int = 20000) -> float:
    """Map with the engine, then build and validate each Observation with fhir.resources R4B (the obvious way)."""
    from fhir.resources.R4B.observation import Observation

    from schoolslink.mapping.engine import load_mappings

    cm = load_mappings().compile("school-context-observations")
    t0 = time.perf_counter()
    made = 0
    for i in range(n // 4):
        record = {"learner_key": f"lrn-{i}", "school_urn": "900001", "trust_ods": "R9X",
                  "patient_ref": f"Patient/p{i}", "effective": "2026-11-26",
                  "values": {"attendance_percent": 93.0, "sen_provision": "K", "exclusions_fixed_count": 0,
                             "year_group": "9"}}
        for r in cm.run(record)["resources"]:
            Observation.model_validate(r)
            made += 1
    return made / (time.perf_counter() - t0)


def _sampled(cmd: list[str], what: str, env: dict[str, str] | None = None) -> tuple[str, float, TreeSampler]:
    """Run `cmd` in a process tree of its own, sampling its memory: (stdout, wall seconds, the sampler)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{stderr[-3000:]}")
    return stdout, wall, sampler


def run_demo(schools: int, pupils: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "schoolslink.cli", "demo", "--schools", str(schools), "--pupils", str(pupils),
           "--out", str(out), "--date", "2026-11-26", "--json"]
    stdout, wall, sampler = _sampled(cmd, f"demo at {schools} schools / {pupils} pupils")
    doc = json.loads(stdout.strip().splitlines()[-1])
    s = doc["summaries"]
    return {
        "schools": schools, "pupils": pupils, "wall_s": round(wall, 1),
        "peak_rss_pipeline_mb": round(sampler.peak_pipeline / 2**20),
        "peak_rss_fhir_peer_mb": round(sampler.peak_peer / 2**20),
        "resources_sent": s.get("mis_ingest", {}).get("sent", 0),
        "feed_rows": s.get("school_feeds", {}).get("feed_rows", 0),
        "pupils_read": s.get("mis_ingest", {}).get("read", 0),
    }


def run_feeds(home: Path, schools: int) -> dict[str, Any]:
    """Every school's feed for the next night, on the state the demo left (`schoolslink feeds build`), alone in a
    process tree of its own: time and peak RSS of building all schools' feeds in every format."""
    night = "2026-11-27"
    out = home / "bench-feeds"
    cmd = [sys.executable, "-m", "schoolslink.cli", "feeds", "build", "--date", night, "--out", str(out)]
    _, wall, sampler = _sampled(cmd, f"feeds build at {schools} schools", {**os.environ, "SCHOOLSLINK_HOME": str(home)})
    folders = [p for p in out.glob(f"*/{night}") if p.is_dir()]
    size = sum(f.stat().st_size for d in folders for f in d.iterdir())
    return {"feeds": len(folders), "feeds_wall_s": round(wall, 2),
            "feeds_peak_rss_mb": round(sampler.peak_pipeline / 2**20), "feeds_bytes": size,
            "feeds_ms_per_school": round(1000 * wall / max(1, len(folders)), 1)}


def _baseline_in_child() -> float:
    """The baseline in a child process with its own key, so nothing leaks into the demo's environment."""
    env = {**os.environ, "SCHOOLSLINK_KEY": "bench-baseline"}
    code = "from benchmarks.run import baseline_observations_per_second as b; print(b())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20x6000,500x250000", help="comma-separated SCHOOLSxPUPILS")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"baseline_r4b_observations_per_s": round(_baseline_in_child())}
    report["runs"] = []
    for size in args.sizes.split(","):
        schools, pupils = (int(x) for x in size.split("x"))
        r = run_demo(schools, pupils, out / f"home-{schools}x{pupils}")
        r["pupils_per_s_end_to_end"] = round(pupils / r["wall_s"])
        r.update(run_feeds(out / f"home-{schools}x{pupils}", schools))
        report["runs"].append(r)
        print(json.dumps(r), flush=True)
    if len(report["runs"]) > 1:  # cost per pupil at the largest size over the smallest: 1.0 is linear
        small, big = report["runs"][0], report["runs"][-1]
        report["feeds_per_pupil_cost_ratio"] = round(
            (big["feeds_wall_s"] / big["pupils"]) / (small["feeds_wall_s"] / small["pupils"]), 2)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
