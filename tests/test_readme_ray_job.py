"""The README's Ray-job commands, as written, from a fresh HOME on this CPU machine: its `export` and
`ray get-auth-token` line and its `ray job submit` line run verbatim (bash, in the checkout); its `ray start`
line runs with isolation flags appended (free ports, its own --temp-dir, --block, so that it neither takes
this shared machine's default ports nor needs `ray stop`, which stops everyone's Ray), and the submit finds
that head through RAY_ADDRESS. Then the SDK gets completions and `ray job stop` ends the job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.test_ray_job import MARKER, REPO, RayHead, _free_ports, stop_head, wait_for_serving

pytestmark = [pytest.mark.slow]
VENV_BIN = REPO / ".venv" / "bin"


class TokenRayHead(RayHead):
    """A head with token authentication: its REST API wants the token, as `Authorization: Bearer`."""

    def get(self, path: str) -> Any:
        token = (Path(self.env["HOME"]) / ".ray" / "auth_token").read_text().strip()
        req = urllib.request.Request(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as reply:
            return json.load(reply)

    def up(self) -> bool:
        try:
            return bool(self.get("/api/version"))
        except (OSError, ValueError):
            return False

    def job_info(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/jobs/{job_id}"))


def readme_ray_lines() -> list[str]:
    """The lines of the README's Ray-job code block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```\n\s*(export RAY_AUTH_MODE=.*?)```", text, re.S)
    assert block, "the README's Ray-job block is gone"
    return [line.strip() for line in block.group(1).strip().splitlines()]


@pytest.mark.timeout(600)
def test_readme_ray_job_commands_serve_completions() -> None:
    if not (VENV_BIN / "ray").exists():
        pytest.skip("the README's commands run from the checkout's .venv (make it with the README's set-up line)")
    auth, start, submit = readme_ray_lines()
    assert start.startswith(".venv/bin/ray start --head") and submit.startswith(".venv/bin/ray job submit")
    temp = Path(tempfile.mkdtemp(prefix="pdrm-"))
    home = temp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"HOME": str(home), MARKER: home.name, "PATH": "/usr/local/bin:/usr/bin:/bin"})
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    isolation = (f" --block --port {gcs} --dashboard-port {dash} --ray-client-server-port {client} "
                 f"--dashboard-agent-listen-port {agent_http} --dashboard-agent-grpc-port {agent_grpc} "
                 f"--runtime-env-agent-port {runtime_env} --metrics-export-port {metrics} "
                 f"--node-manager-port {node_mgr} --object-manager-port {obj_mgr} --temp-dir {temp / 'ray'} "
                 "--disable-usage-stats")
    with open(temp / "head.log", "wb") as log:
        proc = subprocess.Popen(["bash", "-c", f"{auth}\nexec {start}{isolation}"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    head = TokenRayHead(proc, temp, f"http://127.0.0.1:{dash}", {**env, "RAY_AUTH_MODE": "token"}, home.name)
    try:
        end = time.monotonic() + 120
        while not head.up():
            assert proc.poll() is None and time.monotonic() < end, (temp / "head.log").read_text()[-4000:]
            time.sleep(1)
        assert (home / ".ray" / "auth_token").is_file()
        # The README's submit follows the job's log until it ends: run it, read its job id, let it follow.
        submitter = subprocess.Popen(["bash", "-c", f"{auth}\n{submit}"], cwd=REPO,
                                     env={**env, "RAY_ADDRESS": head.dashboard}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        job_id = None
        assert submitter.stdout is not None
        for line in submitter.stdout:
            if found := re.search(r"Job '([^']+)' submitted successfully", line):
                job_id = found.group(1)
                break
        assert job_id, "ray job submit did not submit"
        address = wait_for_serving(head, job_id)
        assert address == "127.0.0.1:50051"
        from pdserve import Client

        with Client(address, timeout=60) as sdk:
            result = sdk.generate("The README's Ray job", max_tokens=8, temperature=0, ignore_eos=True)
        assert len(result.token_ids) == 8 and result.prefill_worker.startswith("prefill-")
        head.job("stop", job_id, timeout=120)
        assert head.job_status(job_id) == "STOPPED"
        assert "pdserve: stopped" in head.job("logs", job_id)
        submitter.wait(60)
    finally:
        stop_head(head)
        shutil.rmtree(temp, ignore_errors=True)
