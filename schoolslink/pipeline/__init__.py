"""Pipeline stages: plain functions over a batch, each called by one Airflow task (or directly in tests)."""
