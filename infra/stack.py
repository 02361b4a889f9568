"""The team stack on one machine: a real MLflow server, a real Prefect server and a
Prefect worker, each a background process on loopback with its pid and log under
`<workspace>/stack/`. `squeeze stack up|down|status` drives it; flows use it through
MLFLOW_TRACKING_URI and PREFECT_API_URL (printed by `up`).

For Postgres + object storage instead of SQLite + a folder, see infra/compose.yaml.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the stack is for this machine and its tunnels
WORK_POOL = "squeezeflow"


@dataclass(frozen=True)
class StackConfig:
    root: Path  # holds pids, logs, the MLflow database and artifacts, PREFECT_HOME
    mlflow_port: int = 5000
    prefect_port: int = 4200
    backend_store_uri: str | None = None  # e.g. postgresql://...; default SQLite in root
    artifacts_destination: str | None = None  # e.g. s3://bucket/path; default a folder

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def environment(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "PREFECT_API_URL": self.prefect_api_url}


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    health_url: str | None  # None: alive while its process runs (the worker)
    env: dict[str, str]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def services(config: StackConfig) -> list[Service]:
    root = config.root
    prefect_env = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "true"),
    }
    return [
        Service(
            name="mlflow",
            command=[
                _bin("mlflow"), "server", "--host", HOST, "--port", str(config.mlflow_port),
                "--backend-store-uri",
                config.backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                config.artifacts_destination or str(root / "mlartifacts"),
                "--workers", "1",
            ],
            health_url=f"{config.mlflow_url}/health",
            env={"MLFLOW_DISABLE_TELEMETRY": "true"},
        ),
        Service(
            name="prefect",
            command=[_bin("prefect"), "server", "start", "--host", HOST,
                     "--port", str(config.prefect_port)],
            health_url=f"{config.prefect_api_url}/health",
            env=prefect_env,
        ),
        Service(
            name="worker",
            command=[_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
            health_url=None,
            env={**prefect_env, **config.environment()},
        ),
    ]


def _pid_file(config: StackConfig, service: Service) -> Path:
    return config.root / f"{service.name}.pid"


def running_pid(config: StackConfig, service: Service) -> int | None:
    path = _pid_file(config, service)
    if not path.exists():
        return None
    pid = int(path.read_text().strip())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink()
        return None
    return pid


def healthy(url: str | None) -> bool:
    if url is None:
        return True
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def up(config: StackConfig, timeout_s: float = 180.0) -> dict[str, str]:
    """Start whatever is not running, wait until each answers; returns the env to export."""
    config.root.mkdir(parents=True, exist_ok=True)
    for service in services(config):
        if running_pid(config, service) is None:
            log = (config.root / f"{service.name}.log").open("ab")
            process = subprocess.Popen(
                service.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **service.env}, start_new_session=True, cwd=config.root,
            )
            _pid_file(config, service).write_text(str(process.pid))
        _wait_healthy(config, service, timeout_s)
    return config.environment()


def down(config: StackConfig) -> list[str]:
    """Stop every running service (whole process groups); returns the names stopped."""
    stopped = []
    for service in reversed(services(config)):
        pid = running_pid(config, service)
        if pid is None:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and running_pid(config, service) is not None:
            time.sleep(0.2)
        if running_pid(config, service) is not None:
            os.killpg(pid, signal.SIGKILL)
        _pid_file(config, service).unlink(missing_ok=True)
        stopped.append(service.name)
    return stopped


def status(config: StackConfig) -> dict[str, str]:
    report = {}
    for service in services(config):
        pid = running_pid(config, service)
        if pid is None:
            report[service.name] = "stopped"
        else:
            state = "healthy" if healthy(service.health_url) else "not answering"
            report[service.name] = f"running (pid {pid}), {state}"
    return report


def _wait_healthy(config: StackConfig, service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_pid(config, service) is None:
            log = config.root / f"{service.name}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{service.name} exited during start-up; log tail:\n{tail}")
        if healthy(service.health_url):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{service.name} did not answer {service.health_url} in {timeout_s:.0f} s")
