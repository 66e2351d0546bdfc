"""`ray job submit` against a real local head with token auth, the way users run jobs.

The smoke tests check the auth path and the job's interpreter with a trivial
entrypoint; `test_jobs_train_submit` runs the real training job end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.helpers.ray_head import RayHead, local_ray_head, ray_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
# What never needs to travel with --working-dir (the venv alone is gigabytes).
EXCLUDES = [".venv", ".git", "runs", "exports", "**/__pycache__", ".pytest_cache"]
NUM_CPUS = 4

_SMOKE = (
    "import json, sys, ray; ray.init(); "
    "print('PREFIX=' + sys.prefix); "
    "print('RESOURCES=' + json.dumps(ray.cluster_resources()))"
)


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head(num_cpus=NUM_CPUS) as head:
        yield head


def submit(
    head: RayHead,
    entrypoint: Sequence[str],
    submission_id: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300,
) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- <entrypoint>`, waiting for the end."""
    cmd = [
        ray_cli(), "job", "submit",
        "--address", head.dashboard_url,
        "--submission-id", submission_id,
        "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--", *entrypoint,
    ]  # fmt: skip
    try:
        return subprocess.run(
            cmd, env=dict(env or head.env), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        subprocess.run(
            [ray_cli(), "job", "stop", "--address", head.dashboard_url, submission_id],
            env=dict(head.env), capture_output=True, timeout=60,
        )  # fmt: skip
        pytest.fail(f"job {submission_id} still running after {timeout_s}s")


def job_result(head: RayHead, submission_id: str) -> tuple[str, str]:
    """(status, driver logs) from the Jobs API."""
    status = head.jobs_api(submission_id)["status"]
    logs = head.jobs_api(f"{submission_id}/logs")["logs"]
    return status, logs


def test_trivial_job_succeeds_with_token(ray_head):
    result = submit(ray_head, ["python", "-c", _SMOKE], "smoke-ok")
    status, logs = job_result(ray_head, "smoke-ok")
    assert result.returncode == 0, result.stdout + result.stderr
    assert status == "SUCCEEDED", logs

    printed = dict(
        line.split("=", 1)
        for line in logs.splitlines()
        if line.startswith(("PREFIX=", "RESOURCES="))
    )
    # The driver connected (with the inherited token) and saw the head's CPUs.
    assert json.loads(printed["RESOURCES"])["CPU"] == NUM_CPUS
    # `python` in the entrypoint resolved to this venv's interpreter.
    assert printed["PREFIX"] == sys.prefix


def test_submit_without_token_is_rejected(ray_head):
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH_")}
    result = submit(ray_head, ["python", "-c", "pass"], "smoke-no-token", env=env)
    assert result.returncode != 0
    assert "Unauthorized" in result.stdout + result.stderr


def test_submit_with_wrong_token_is_rejected(ray_head):
    env = {**ray_head.env, "RAY_AUTH_TOKEN": "0" * 64}  # takes precedence over the path
    result = submit(ray_head, ["python", "-c", "pass"], "smoke-bad-token", env=env)
    assert result.returncode != 0
    assert "Forbidden" in result.stdout + result.stderr


def test_submit_script_reaches_head(ray_head, tmp_path):
    """scripts/submit.sh: the right entrypoint, run by the venv's python, token sent."""
    env = {**ray_head.env, "RAY_JOB_SUBMIT_ARGS": "--submission-id script-smoke"}
    args = ["--steps", "1", "--workers", "1", "--storage", str(tmp_path), "--run", "script-smoke"]
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "submit.sh"), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    status, logs = job_result(ray_head, "script-smoke")
    assert f"Running entrypoint for job script-smoke: python -m jobs.train {' '.join(args)}" in logs
    # The job must succeed, not merely agree with the client's exit code.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert status == "SUCCEEDED", logs[-5000:]
    assert committed_and_verified(tmp_path, "script-smoke") == [(1, "full"), (1, "serving")]


def committed_and_verified(storage: Path, run: str) -> list[tuple[int, str]]:
    """The run's committed (step, tier) keys, each checkpoint verified down the
    checksum chain (row -> manifest -> every tensor) by the project's verifier."""
    from distributed.checkpoint import Catalog, RunLayout, verify_checkpoint

    run_layout = RunLayout(str(storage), run)
    keys = []
    for entry in Catalog(run_layout).entries():
        report = verify_checkpoint(
            os.path.join(run_layout.root, entry.path), manifest_crc32c=entry.manifest_crc32c
        )
        assert report.ok and report.num_tensors > 0, report
        keys.append((entry.step, entry.tier))
    return sorted(keys)


def test_jobs_train_submit(ray_head, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    entrypoint = [
        "python", "-m", "jobs.train",
        "--steps", "30", "--workers", "2",
        "--storage", str(storage), "--run", "submit-test",
    ]  # fmt: skip
    result = submit(ray_head, entrypoint, "submit-test", timeout_s=600)
    status, logs = job_result(ray_head, "submit-test")
    assert result.returncode == 0 and status == "SUCCEEDED", logs[-5000:]
    # 30 steps ran: the progress line and the closing table say so, the last
    # step's checkpoints of both tiers are committed and verify, and the full
    # one holds global_step 30.
    assert "step 30/30 " in logs, logs[-5000:]
    assert committed_and_verified(storage, "submit-test") == [(30, "full"), (30, "serving")]
    import tensorflow as tf

    from distributed.checkpoint import RunLayout

    full = RunLayout(str(storage), "submit-test").checkpoint_dir("full", 30)
    assert tf.train.load_checkpoint(os.path.join(full, "model.ckpt")).get_tensor(
        "global_step") == 30
