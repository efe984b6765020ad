"""What a deployment relies on: the smoke script, the systemd unit, the shell scripts, nginx in front."""
import json
import subprocess
import time

import httpx

from tests.helpers import PROJECT_DIR, free_port

SCRIPTS = ["scripts/setup", "scripts/test", "scripts/serve", "scripts/smoke.sh", "scripts/download_models.sh",
           ".ci/run"]


def test_smoke_script_passes_against_a_live_server(server):
    done = subprocess.run(["scripts/smoke.sh", server.url], cwd=PROJECT_DIR, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 9, done.stdout
    assert "ok    GET / (browser): the chat page (Markdown on)" in lines
    assert lines[-1] == "all checks passed"


def test_smoke_script_fails_when_nothing_answers():
    done = subprocess.run(["scripts/smoke.sh", f"http://127.0.0.1:{free_port()}"], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FAIL  health" in done.stdout or "FAIL  GET /health" in done.stdout


def test_smoke_script_fails_on_a_wrong_answer(start_server):
    server = start_server(runner={"emulator": {"fault": "start_fail"}}, wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the worker answers at all (503: the card is unavailable)
        try:
            if httpx.get(server.url + "/health").status_code == 503:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    done = subprocess.run(["scripts/smoke.sh", server.url], cwd=PROJECT_DIR, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "FAIL  GET /health" in done.stdout


def test_systemd_unit_verifies(tmp_path):
    unit = tmp_path / "qwen-chat.service"
    unit.write_text((PROJECT_DIR / "systemd" / "qwen-chat.service").read_text().replace(
        "/opt/qwen-chat", str(PROJECT_DIR)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_shell_scripts_pass_shellcheck():
    done = subprocess.run(["shellcheck", *SCRIPTS], cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_streams_pass_nginx_as_they_are_generated(start_server, nginx):
    server = start_server(runner={"emulator": {"token_ms": 40}})
    front = nginx(server.port).url
    body = {"model": "qwen2.5", "stream": True, "messages": [{"role": "user", "content": "count to 30"}]}
    arrivals = []
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", front + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    arrivals.append(time.monotonic())
                elif line == "data: [DONE]":
                    done_at = time.monotonic()
    # About 100 output ids at 40 ms: the text arrives over seconds, not all at once at the end.
    assert len(arrivals) > 20
    assert done_at - arrivals[0] > 2.0
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 1.0
    # The same through nginx for Ollama's NDJSON.
    lines = []
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", front + "/api/chat", json={**body, "stream": True}) as response:
            for _ in response.iter_lines():
                lines.append(time.monotonic())  # when each NDJSON line arrived
    assert len(lines) > 20 and lines[-1] - lines[0] > 2.0


def test_errors_through_nginx_stay_json(start_server, nginx):
    server = start_server()
    front = nginx(server.port).url
    too_big = httpx.post(front + "/v1/chat/completions", content=b"x" * (2 << 20),
                         headers={"Content-Type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert httpx.post(front + "/api/chat", content=b"x" * (2 << 20)).json() == {
        "error": "the request body is too large"}
    # The service's own errors come through untouched.
    unknown = httpx.post(front + "/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert unknown.status_code in (400, 404) and "error" in unknown.json()
    server.stop()  # nobody behind nginx any more
    gone = httpx.get(front + "/v1/models")
    assert gone.status_code == 502 and gone.json()["error"]["code"] == "upstream_unavailable"


def test_benchmark_scripts_run():
    # Speed is measured by these scripts, not asserted here: this only keeps them working.
    import sys
    done = subprocess.run([sys.executable, "scripts/bench.py", "--only", "throughput", "--only", "startup",
                           "--rounds", "1"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "throughput at 0 ms/token" in done.stdout and "start-up to /health ok" in done.stdout
    done = subprocess.run([sys.executable, "scripts/bench_runner.py", "--rounds", "1", "--count", "20"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ratio driver/bare" in done.stdout, done.stderr[-2000:]


def test_code_passes_ruff():
    done = subprocess.run([str(PROJECT_DIR / ".venv" / "bin" / "ruff"), "check", "app", "scripts", "tests", "wsgi.py"],
                          cwd=PROJECT_DIR, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
