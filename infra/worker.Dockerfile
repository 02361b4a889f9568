# A Prefect worker with squeezeflow installed (CPU torch); used by infra/compose.yaml.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir "torch==2.14.1" && pip install --no-cache-dir -e .
