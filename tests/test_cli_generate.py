"""The client commands, run for real against a proxy under uvicorn on loopback routed
to the WaveSpeed simulator: `generate` (files, --json, exit codes 0/1/2/3/4),
`predictions list|get|cancel`, `models`, `--version`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image

from flux_proxy import Prediction
from providers.simulators import SimConfig, SimulatorServer
from proxy.cli_client import describe
from tests._serve import create_key, serving
from tests.conftest import isolate_env, make_settings

ADMIN = "cli-generate-admin"
CLI = [sys.executable, "-m", "proxy.cli"]


class Proxy:
    def __init__(self, url: str) -> None:
        self.url = url

    def key(self, name: str, **spec: object) -> str:
        return create_key(self.url, ADMIN, name, **spec)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("cli-generate")
    with pytest.MonkeyPatch.context() as mp:
        isolate_env(mp)
        with SimulatorServer("wavespeed", SimConfig(job_latency_s=0.05)) as sim:
            settings = make_settings(tmp, {"wavespeed": sim}, auth_enabled=True,
                                     admin_key=ADMIN, public_base_url="")
            with serving(settings) as url:
                yield Proxy(url)


@pytest.fixture
def env(proxy: Proxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """FLUX_PROXY_URL and a fresh key of this test's own in the environment."""
    values = {"FLUX_PROXY_URL": proxy.url,
              "FLUX_PROXY_API_KEY": proxy.key(f"cli-{tmp_path.name[-20:]}")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    return values


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script in a process of its own (the in-process proxy logs to this
    process's stdout), with this test's environment and folder."""
    return subprocess.run([*CLI, *args], env=dict(os.environ), cwd=os.getcwd(),
                          capture_output=True, text=True, timeout=60)


def test_generate_writes_the_images_and_prints_each(env: dict[str, str], tmp_path: Path) -> None:
    """stdout is a pipe here, so the progress display is plain lines."""
    r = run("generate", "a red fox", "--size", "512*512", "-n", "2", "--seed", "42",
            "-o", "out")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 2 and all(Image.open(f).size == (512, 512) for f in files)
    lines = r.stdout.splitlines()
    # Progress lines (one per change of state), then one line per image.
    assert lines[0].startswith(("queued", "processing")) and lines[0].endswith("s")
    assert any(line.startswith("completed · wavespeed · attempt 1 · ") for line in lines)
    image_lines = [line for line in lines if line.startswith("out/")]
    assert [line.split()[0] for line in image_lines] == [f"out/{f.name}" for f in files]
    for line in image_lines:
        assert "provider=wavespeed seed=42 cost=$0.012000 latency=" in line


def test_generate_json_is_the_prediction(env: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), "blue").save(buf, "PNG")
    source.write_bytes(buf.getvalue())
    r = run("generate", "a fox in winter", "--image", str(source), "--size", "256*256",
            "--provider", "wavespeed", "--json", "-o", "imgs")
    assert r.returncode == 0, r.stderr
    pred = json.loads(r.stdout)  # nothing else on stdout
    assert pred["status"] == "completed" and pred["provider"] == "wavespeed"
    assert [p.name for p in (tmp_path / "imgs").iterdir()] == [f"{pred['id']}-0.jpg"]


def test_exit_codes(proxy: Proxy, env: dict[str, str], tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    failed = run("generate", "[sim:fail-after-accept] a fox", "--json")
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["status"] == "failed" and "error:" in failed.stderr

    bad_size = run("generate", "a fox", "--size", "99*99")
    assert bad_size.returncode == 2 and "size" in bad_size.stderr
    unknown = run("generate", "a fox", "--provider", "nope")
    assert unknown.returncode == 2 and "providers" in unknown.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    not_image = run("generate", "a fox", "--image", "notes.txt")
    assert not_image.returncode == 2 and "not a JPEG, PNG, GIF or WebP" in not_image.stderr
    assert run("generate").returncode == 2  # no prompt

    refused = run("generate", "[sim:moderate] a fox")
    assert refused.returncode == 3 and "policy_refusal" in refused.stderr

    monkeypatch.setenv("FLUX_PROXY_API_KEY", proxy.key("cli-poor", budget_usd="0.01"))
    broke = run("generate", "a fox")
    assert broke.returncode == 4 and "402 budget_exceeded" in broke.stderr
    monkeypatch.setenv("FLUX_PROXY_API_KEY", proxy.key("cli-rate", rate="1/m", burst=1))
    assert run("predictions", "cancel", run_id("[sim:latency=5] one")).returncode == 0
    limited = run("generate", "two")
    assert limited.returncode == 4 and "429 rate_limited" in limited.stderr
    assert "retry after 60 s" in limited.stderr

    monkeypatch.setenv("FLUX_PROXY_API_KEY", "fpk_wrong")
    assert run("models").returncode == 2
    down = run("models", "--url", "http://127.0.0.1:1")
    assert down.returncode == 1 and "cannot reach the proxy" in down.stderr


def run_id(prompt: str) -> str:
    """Submit without waiting (the client, as `generate` would): the id."""
    from flux_proxy import FluxProxy

    with FluxProxy() as client:  # FLUX_PROXY_URL / FLUX_PROXY_API_KEY from the env
        return client.submit(prompt).id


def test_predictions_list_get_cancel_and_models(env: dict[str, str]) -> None:
    done = json.loads(run("generate", "a listed fox", "--seed", "3", "--json").stdout)
    slow = run_id("[sim:latency=5] a fox to cancel")

    listed = run("predictions", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["id", "status", "provider"]
    assert [r.split()[0] for r in rows] == [slow, done["id"]]
    only = run("predictions", "list", "--status", "completed", "--limit", "1", "--json")
    assert [json.loads(line)["id"] for line in only.stdout.splitlines()] == [done["id"]]

    got = run("predictions", "get", done["id"])
    assert got.returncode == 0 and f"id: {done['id']}" in got.stdout
    assert "seed: 3" in got.stdout and "attempts: wavespeed:completed" in got.stdout
    assert json.loads(run("predictions", "get", done["id"], "--json").stdout)["seed"] == 3
    missing = run("predictions", "get", "nope")
    assert missing.returncode == 1 and "404" in missing.stderr

    canceled = run("predictions", "cancel", slow)
    assert canceled.returncode == 0 and canceled.stdout.startswith(f"{slow}: ")
    again = run("predictions", "cancel", done["id"])
    assert again.returncode == 1 and "409" in again.stderr

    models = run("models")
    assert models.returncode == 0, models.stderr
    assert models.stdout.splitlines()[1].split()[:4] == ["flux-dev", "wavespeed", "wavespeed",
                                                         "yes"]
    assert json.loads(run("models", "--json").stdout)["data"][0]["id"] == "flux-dev"


def test_version() -> None:
    r = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"flux-proxy, version {version('flux-proxy')}"


def test_the_progress_line_says_where_a_prediction_is() -> None:
    pred = Prediction.from_json({"id": "p1", "status": "processing", "provider": "local",
                                 "attempts": [{"provider": "wavespeed", "status": "failed"},
                                              {"provider": "local", "status": "processing"}],
                                 "progress": {"step": 7, "total": 28}})
    assert describe(pred, 3.14) == "processing · local · attempt 2 · step 7 of 28 · 3.1s"
    assert describe(Prediction.from_json({"id": "p2", "status": "queued"}), 0) == \
        "queued · 0.0s"


def test_the_client_variables_do_not_stop_the_server_commands(tmp_path: Path) -> None:
    """A shell that exports FLUX_PROXY_URL / FLUX_PROXY_API_KEY can still run `serve`,
    `keys` and `db`: they are not unknown settings to the proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_PROXY_")}
    env |= {"FLUX_PROXY_URL": "http://127.0.0.1:8080", "FLUX_PROXY_API_KEY": "fpk_x",
            "FLUX_PROXY_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    r = subprocess.run([*CLI, "db", "upgrade"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
