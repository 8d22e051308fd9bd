# syntax=docker/dockerfile:1
# The schoolslink image: Airflow (api-server, scheduler, dag-processor, triggerer, Celery worker), the
# `schoolslink` CLI and the MLLP listener, all from the locked dependencies in uv.lock.
#
#   docker build -t schoolslink:local .
#
# No pupil data, key or password is baked in: state lives on volumes, secrets arrive at run time
# (docker-compose.yml, .env.example).
FROM python:3.11-slim

ARG UV_VERSION=0.13.8
# CeleryExecutor needs the Celery provider, which pyproject.toml / uv.lock do not carry yet: it is
# added on top of the locked environment, pinned. (Better: a `production` dependency group in the lock.)
ARG AIRFLOW_UID=50000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/schoolslink/.venv \
    VIRTUAL_ENV=/opt/schoolslink/.venv \
    PATH=/opt/schoolslink/.venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/schoolslink/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    SCHOOLSLINK_HOME=/var/lib/schoolslink \
    GX_ANALYTICS_ENABLED=false

RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow

WORKDIR /opt/schoolslink

# Dependencies first (their own layer, rebuilt only when the lock changes).
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --group production --no-install-project

# The project itself. `uv sync` installs it editable, so code finds agreements/, expectations/ and
# mappings/ beside it, as in a checkout.
COPY schoolslink/ schoolslink/
COPY connectors/ connectors/
COPY dags/ dags/
COPY mappings/ mappings/
COPY agreements/ agreements/
COPY expectations/ expectations/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --group production \
    && mkdir -p /opt/airflow/logs /var/lib/schoolslink \
    && chown -R "${AIRFLOW_UID}:0" /opt/airflow /var/lib/schoolslink \
    && chmod -R g+rwX /opt/airflow /var/lib/schoolslink

USER ${AIRFLOW_UID}
WORKDIR /opt/airflow
# 8080 api-server, 8974 scheduler health, 8793 task log server, 2575 MLLP listener
EXPOSE 8080 8974 8793 2575
CMD ["airflow", "version"]
