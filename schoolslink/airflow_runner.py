"""Runs DAGs through Airflow's `dag.test()` on a SQLite metadata database under SCHOOLSLINK_HOME.

Started as a child process by `schoolslink demo` (Airflow reads its configuration from the
environment at import, so the parent sets it first): `python -m schoolslink.airflow_runner DAG_ID...`.
Prints one JSON line per DAG run: {"dag_id", "run_id", "state"}.

Logging: `airflow_env` points Airflow's `[logging] logging_config_class` at `schoolslink.airflow_glue.LOGGING_CONFIG`
(the pseudonymising processor in the task log write path) unless the environment already sets it, and `main`
installs the pseudonymising filter (`schoolslink.logfilter`) once Airflow has configured logging in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"


def airflow_env(schoolslink_home: Path) -> dict[str, str]:
    af_home = schoolslink_home / "airflow"
    af_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "SCHOOLSLINK_HOME": str(schoolslink_home),
        "AIRFLOW_HOME": str(af_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{af_home / 'airflow.db'}",
        "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
        "AIRFLOW__LOGGING__LOGGING_LEVEL": env.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS": env.get("AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS",
                                                          "schoolslink.airflow_glue.LOGGING_CONFIG"),
        "GX_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    })
    return env


def ensure_metadata_db(env: dict[str, str]) -> None:
    db = Path(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].split("///", 1)[1])
    if db.exists():
        return
    airflow = Path(sys.executable).with_name("airflow")
    res = subprocess.run([str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {res.stderr[-2000:]}")


def _load_dag(dag_id: str) -> Any:
    path = DAGS / f"{dag_id}.py"
    spec = importlib.util.spec_from_file_location(f"schoolslink_dag_{dag_id}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from airflow.sdk import DAG

    for value in vars(mod).values():
        if isinstance(value, DAG) and value.dag_id == dag_id:
            return value
    raise RuntimeError(f"{path} defines no DAG {dag_id}")


def main(argv: list[str]) -> int:
    from schoolslink import logfilter

    logfilter.install()  # before Airflow is imported: our loggers and the root logger
    import airflow.sdk  # noqa: F401 - configures Airflow's logging (structlog, stdlib handlers) in this process

    logfilter.install()  # again, on the handlers and the structlog chain Airflow has just set up
    logical = os.environ.get("SCHOOLSLINK_LOGICAL_DATE")
    failed = 0
    for dag_id in argv:
        dag = _load_dag(dag_id)
        kwargs: dict[str, Any] = {}
        if logical:
            kwargs["logical_date"] = datetime.fromisoformat(logical)
        dr = dag.test(**kwargs)
        state = str(getattr(dr, "state", "unknown"))
        print(json.dumps({"dag_id": dag_id, "run_id": dr.run_id, "state": state}), flush=True)
        failed += state != "success"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
