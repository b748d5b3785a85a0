"""Against a real `prefect server start`: scheduled runs served by `thermocal serve`, the API's
parameter checks, and the UI in headless Chromium. Every process started here is stopped by its id."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.daemon import healthy as server_healthy
from flows.daemon import server_env
from tests.conftest import SHIPPED_DATA

BIN = Path(sys.executable).parent
STAGES = ["ingest", "normalize", "split", "train", "validate", "infer", "report"]
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process (and the group it leads) by its id; kill it if it does not exit in time."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on a free loopback port with a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("real-server-home")
    port = _free_port()
    log = open(home / "server.log", "w")
    env = {**server_env(port), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not server_healthy(port):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"the Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    client_env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    yield {"port": port, "env": client_env, "home": home}
    _stop(process)
    log.close()


def _client(server):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(server["env"]["PREFECT_API_URL"])


def _completed_runs(client, deployment_id) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
        sort=FlowRunSort.START_TIME_ASC,
    )


def _stage_states(client, flow_run_id, timeout: float = 30.0) -> dict[str, str]:
    """Each stage's final state; task runs reach the server as events, a moment after the flow run's state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))) if r.name in STAGES]
        complete = len(runs) == len(STAGES) and all(r.state is not None and r.state.is_final() for r in runs)
        if complete or time.monotonic() > deadline:
            return {r.name: r.state.name if r.state else None for r in runs}
        time.sleep(0.5)


def _wait_for(predicate, timeout: float, what: str, serve: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if serve.poll() is not None:
            pytest.fail(f"thermocal serve exited with {serve.returncode}: {log.read_text()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"timed out waiting for {what}: {log.read_text()[-3000:]}")


def test_scheduled_runs_train_then_cache_then_retrain_on_new_readings(server, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    data = tmp_path / "readings.csv"
    shutil.copy(SHIPPED_DATA, data)
    log = tmp_path / "serve.log"
    name = f"test-{uuid.uuid4().hex[:6]}"
    # 20000 epochs of torch.optim.SGD take a few seconds: long enough for the progress artifact
    serve = subprocess.Popen(
        [str(BIN / "thermocal"), "serve", "--interval", "5", "--name", name, "--data", str(data),
         "--store", str(tmp_path / "store"), "--strategy", "optimizer", "--epochs", "20000"],
        env=server["env"], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        client = _client(server)
        deployment = _wait_for(lambda: _deployment(client, name), 120, "the deployment", serve, log)
        assert deployment.parameters["settings"]["strategy"] == "optimizer"
        assert deployment.parameters["data"] == str(data)

        first = _wait_for(lambda: _completed_runs(client, deployment.id)[:1], 180, "a completed scheduled run", serve, log)[0]
        assert _stage_states(client, first.id) == {stage: "Completed" for stage in STAGES}
        assert {"strategy:optimizer", "normalize:standard", "optimizer:sgd"} <= set(first.tags)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id])))
        by_key = {a.key: a for a in artifacts}
        assert {"thermocal-metrics", "thermocal-report", "thermocal-training-progress"} <= set(by_key)
        assert "°C =" in by_key["thermocal-report"].data and "data:image/png;base64," in by_key["thermocal-report"].data
        assert float(by_key["thermocal-training-progress"].data) == 100.0
        assert any(row["metric"].startswith("slope") for row in json.loads(by_key["thermocal-metrics"].data))

        # unchanged data: the next scheduled run is all cache hits
        second = _wait_for(lambda: _completed_runs(client, deployment.id)[1:2], 120, "a second scheduled run", serve, log)[0]
        assert _stage_states(client, second.id) == {stage: "Cached" for stage in STAGES}

        # a new reading appended: the next scheduled run ingests and trains again
        with open(data, "a") as handle:
            handle.write("40.0,4.5\n")
        seen = len(_completed_runs(client, deployment.id))
        later = _wait_for(lambda: _completed_runs(client, deployment.id)[seen:seen + 1], 120, "a run after new readings", serve, log)[0]
        states = _stage_states(client, later.id)
        assert states["ingest"] == "Completed" and states["train"] == "Completed"
    finally:
        code = _stop(serve, signal.SIGTERM, timeout=60)
    assert code == 0, log.read_text()[-2000:]
    assert _client(server).read_deployment(deployment.id).paused  # Prefect pauses a served schedule on shutdown


def _deployment(client, name):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"thermocal-calibrate/{name}")
    except ObjectNotFound:
        return None


def test_the_api_refuses_bad_parameters_and_runs_custom_ones(server, tmp_path):
    """What the UI's Run form sends: parameters checked by the server against the typed schema."""
    import httpx

    log = tmp_path / "serve.log"
    name = f"form-{uuid.uuid4().hex[:6]}"
    serve = subprocess.Popen(
        [str(BIN / "thermocal"), "serve", "--cron", "0 0 1 1 *", "--name", name, "--data", str(SHIPPED_DATA),
         "--store", str(tmp_path / "store"), "--epochs", "200"],
        env=server["env"], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        client = _client(server)
        deployment = _wait_for(lambda: _deployment(client, name), 120, "the deployment", serve, log)
        for bad, words in [({"lr": -1}, ["settings.lr", "minimum of 0"]), ({"strategy": "magic"}, ["strategy", "analytic", "autograd"]),
                           ({"val_fraction": 1.5}, ["val_fraction"]), ({"optimizer": "nope"}, ["optimizer", "adam"]),
                           ({"model": "cubic"}, ["model", "cubic", "poly:[1-5]"]), ({"model": "poly:9"}, ["model", "poly:9"])]:
            with pytest.raises(httpx.HTTPStatusError) as refused:
                client.create_flow_run_from_deployment(deployment.id, parameters={"settings": {**deployment.parameters["settings"], **bad}})
            assert refused.value.response.status_code == 409
            for word in words:
                assert word in refused.value.response.text

        custom = client.create_flow_run_from_deployment(
            deployment.id, parameters={"settings": {**deployment.parameters["settings"], "strategy": "autograd", "lr": 0.05, "model": "poly:2"}}
        )
        done = _wait_for(lambda: (r := client.read_flow_run(custom.id)).state.is_final() and r, 180, "the custom run", serve, log)
        assert done.state.is_completed(), done.state.message
        assert "strategy:autograd" in done.tags
        recorded = [json.loads(p.read_text()) for p in (tmp_path / "store").glob("*/manifest.json")]
        assert [m["results"]["model"]["spec"] for m in recorded if m["flow_run_id"] == str(custom.id)] == ["poly:2"]
    finally:
        assert _stop(serve, signal.SIGTERM, timeout=60) == 0


def test_the_ui_shows_the_run_its_stages_and_its_report(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    out = subprocess.run(
        [str(BIN / "thermocal"), "run", "--json", "--data", str(SHIPPED_DATA), "--store", str(tmp_path / "store"), "--epochs", "300",
         "--predict", "45.5"],
        env=server["env"], capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    flow_run_id = json.loads((Path(json.loads(out.stdout)["run_dir"]) / "manifest.json").read_text())["flow_run_id"]
    flow_run = _client(server).read_flow_run(uuid.UUID(flow_run_id))
    ui = f"http://127.0.0.1:{server['port']}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            with page.expect_response(lambda r: r.url.endswith(f"/flow_runs/{flow_run_id}/graph-v2"), timeout=90_000) as drawn:
                page.goto(f"{ui}/runs/flow-run/{flow_run_id}", wait_until="networkidle", timeout=90_000)
            # the run graph as the UI draws it: each stage's arrows come from the stages before it in
            # the pipeline only, and the stages start in the pipeline's order
            nodes = {node["label"]: node for _, node in drawn.value.json()["nodes"]}
            ids = {node["id"]: label for label, node in nodes.items()}
            parents = {label: sorted({ids[p["id"]] for p in node["parents"]}) for label, node in nodes.items()}
            assert parents == {"ingest": [], "normalize": ["ingest"], "split": ["ingest"], "train": ["normalize", "split"],
                               "validate": ["train"], "infer": ["train"], "report": ["infer", "validate"], "record-run": ["report"]}
            starts = [nodes[stage]["start_time"] for stage in STAGES]
            assert starts == sorted(starts)
            page.get_by_text(flow_run.name).first.wait_for(timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.get_by_text("Task Runs", exact=True).first.click()
            for stage in STAGES:
                page.get_by_text(stage, exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=tmp_path / "flow-run-task-runs.png", full_page=True)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("thermocal-metrics", exact=True).first.wait_for(timeout=60_000)
            page.get_by_text("thermocal-report", exact=True).first.click()
            page.get_by_text("°C =").first.wait_for(timeout=60_000)
            page.get_by_text("New readings", exact=True).first.wait_for(timeout=60_000)  # the run's answers, in the report
            page.get_by_text("45.5", exact=True).first.wait_for(timeout=60_000)
            plot = page.locator("img[src^='data:image/png']").first
            plot.wait_for(timeout=60_000)
            assert plot.evaluate("img => img.complete && img.naturalWidth") > 500  # the plot decoded and drew
            page.screenshot(path=tmp_path / "report-artifact.png", full_page=True)
        finally:
            browser.close()
    for shot in ("flow-run-task-runs.png", "report-artifact.png"):
        assert (tmp_path / shot).stat().st_size > 10_000


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(server, tmp_path):
    from prefect.deployments import run_deployment

    root = Path(__file__).resolve().parents[1]
    prefect = str(BIN / "prefect")
    env = server["env"]
    subprocess.run([prefect, "work-pool", "create", "thermocal", "--type", "process"], env=env, check=True, capture_output=True, timeout=120)
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    client = _client(server)
    deployment = client.read_deployment_by_name("thermocal-calibrate/scheduled")
    assert deployment.work_pool_name == "thermocal"
    assert deployment.schedules and deployment.schedules[0].schedule.interval.total_seconds() == 3600
    assert deployment.parameters["data"] == "data/readings.csv"

    log = tmp_path / "worker.log"
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "thermocal"], env=env, cwd=tmp_path,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            flow_run = run_deployment(
                "thermocal-calibrate/scheduled", timeout=240,
                parameters={"data": str(SHIPPED_DATA), "store": str(tmp_path / "store"), "settings": {"epochs": 200}},
            )
        assert flow_run.state.is_completed(), log.read_text()[-3000:]
        assert list((tmp_path / "store").glob("*/manifest.json"))
    finally:
        _stop(worker, signal.SIGTERM, timeout=30)
