"""The Serve app over HTTP on 127.0.0.1, on the session's Ray: a real trained debug run, its best
checkpoint, the OpenAI client, streaming, every 4xx, fuzzed bodies, overload, timeouts."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_ray.checkpoint import load_model, read_train_state
from llm_ray.checkpoint.best import model_dirs, val_loss_at_step
from llm_ray.config.serve import ServeConfig
from llm_ray.data.tokenizer import eot_id
from llm_ray.serve.engine import Engine, Sampling
from llm_ray.serve.launch import start
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(trained):
    """Three apps on one Serve: the main one at /, a strict one (1 ms time limit) and a tight one
    (one request at a time, one queued) for overload."""
    from ray import serve

    _, choice = trained
    port = free_port()
    common = dict(checkpoint=str(choice.model_dir), port=port, cpus_per_replica=0.1, torch_threads=1)
    url = start(ServeConfig(**common, max_batch_size=8, stream_interval_ms=0), name="main")
    start(ServeConfig(**{**common, "torch_threads": 2}, route_prefix="/strict", request_timeout_s=0.001,
                      num_replicas=2), name="strict")
    start(ServeConfig(**common, route_prefix="/tight", max_batch_size=1, limits={"max_n": 1, "default_max_tokens": 5},
                      max_ongoing_requests=1, max_queued_requests=1, model_id="tight-model", stream_interval_ms=10_000),
          name="tight")
    yield url
    serve.shutdown()


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def test_best_checkpoint_is_the_lowest_validation_loss(trained):
    cfg, choice = trained
    losses = {}
    for model_dir in model_dirs(cfg.run_dir):
        state = read_train_state(model_dir)
        losses[state["step"]] = val_loss_at_step(state)
    assert sorted(losses) == [10, 20, 30] and choice.compared == 3
    assert choice.step == min(losses, key=losses.get) and choice.val_loss == min(losses.values())


def test_models_carry_provenance(server, trained):
    cfg, choice = trained
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    p = card["provenance"]
    state = read_train_state(choice.model_dir)
    assert card["id"] == "served" and p["run"] == "served" and p["step"] == choice.step
    assert p["checkpoint"] == str(choice.model_dir) and p["val_loss"] == choice.val_loss
    assert p["data_key"] == state["data_key"] and len(p["config_sha256"]) == 16
    evaluation = json.loads((cfg.run_dir / "eval" / "eval.json").read_text())
    assert p["evaluation"]["bits_per_byte"] == evaluation["bits_per_byte"]["value"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_openai_client_completes_and_streams_like_the_generator(server, trained):
    from openai import OpenAI

    _, choice = trained
    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed")
    model, tokenizer, _ = load_model(choice.model_dir)
    prompt = "ROMEO:"
    direct = Engine(model, tokenizer, eot_id(tokenizer)).generate(
        [tokenizer.encode(prompt).ids], Sampling(max_tokens=20, temperature=0))[0]
    out = client.completions.create(model="served", prompt=prompt, max_tokens=20, temperature=0)
    assert out.choices[0].text == direct.texts[0] and out.choices[0].finish_reason == direct.finish_reasons[0]
    assert out.usage.prompt_tokens == direct.prompt_tokens and out.usage.completion_tokens == direct.completion_tokens
    chunks = list(client.completions.create(model="served", prompt=prompt, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.texts[0]
    assert len([c for c in chunks if c.choices]) > 3  # token by token, not one piece
    assert chunks[-1].usage.completion_tokens == direct.completion_tokens
    seeded = [client.completions.create(model="served", prompt=[prompt, "To be"], max_tokens=10, n=2, seed=3)
              for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert [c.index for c in seeded[0].choices] == [0, 1, 2, 3]
    prompt_tokens = len(tokenizer.encode(prompt).ids) + len(tokenizer.encode("To be").ids)
    assert seeded[0].usage.prompt_tokens == prompt_tokens  # each prompt once, whatever n
    assert [m.id for m in client.models.list().data] == ["served"]


def test_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={"prompt": "To be", "max_tokens": 8, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}


def raw_chunks(url: str) -> tuple[int, str]:
    body = {"prompt": "To be", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        chunks = [c for c in r.iter_raw() if c]
    return len(chunks), b"".join(chunks).decode()


def test_stream_interval_groups_pieces_into_fewer_chunks(server):
    """stream_interval_ms 0 (main app) sends each piece as it comes; 10 s (tight app) sends the first
    at once and the rest together at the end. The events are the same."""
    each, text = raw_chunks(server)
    grouped, grouped_text = raw_chunks(server + "/tight")
    assert grouped <= 3 < each
    pieces = [[json.loads(line[6:])["choices"][0]["text"] for line in t.split("\n\n") if line.startswith("data: {")]
              for t in (text, grouped_text)]
    assert pieces[0] == pieces[1] and len(pieces[0]) > 5


def test_stop_sequences_over_http(server):
    full = post(server, {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}).json()["choices"][0]["text"]
    stop = full[8:11]
    cut = post(server, {"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("body, status, says", [
    ({"prompt": "x" * 40, "max_tokens": 60}, 400, "exceeds the model's context of 64 tokens by"),
    ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens: 10000 is over this server's limit of 512"),
    ({"prompt": "a", "n": 9}, 400, "n: 9 is over this server's limit of 4"),
    ({"prompt": ["a"] * 9}, 400, "prompt: 9 is over"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: 5 is over"),
    ({"prompt": "a", "stop": ["", "x"]}, 400, "empty stop string"),
    ({"prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"prompt": "a", "max_tokenz": 3}, 422, "max_tokenz: unknown or unsupported field"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs: 21 is over this server's limit of 20"),
    ({"prompt": "a", "best_of": 2}, 422, "best_of: unknown or unsupported field"),
    ({"prompt": [5, 99_999]}, 400, "prompt: token id 99999 is outside the vocabulary (0 to 511)"),
    ({"prompt": [[5], [-1]]}, 400, "prompt[1]: token id -1 is outside the vocabulary"),
    ({"prompt": [[5], []]}, 400, "must not be empty"),
    ({"max_tokens": 3}, 422, "prompt: Field required"),
    ({"prompt": [], "max_tokens": 3}, 400, "prompt: a list of prompts or of token ids must not be empty"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, says):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_invalid_json_and_oversized_bodies(server):
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "a\\ud800b"}', timeout=30)  # a lone surrogate
    assert r.status_code == 400 and "prompt: not valid Unicode text" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", content=b'{"prompt": "a",', timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/completions", content=json.dumps({"prompt": "a" * 70_000}).encode(), timeout=30)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 100_000), st.floats(allow_nan=False, allow_infinity=False),
                   st.text(max_size=30), st.lists(st.text(max_size=5), max_size=6),
                   st.lists(st.integers(-5, 100_000), max_size=6))
KEYS = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                        "model", "user", "echo", "logprobs", "stream_options", "x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzzed_bodies_never_get_a_server_error(server, body):
    body.setdefault("max_tokens", 4)
    r = post(server, body)
    assert r.status_code < 500, r.text
    if r.status_code == 200 and not body.get("stream"):
        assert r.json()["object"] == "text_completion"


def burst(url: str, requests: int = 8) -> list[int]:
    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(lambda _: post(url, {"prompt": "To be", "max_tokens": 50}).status_code, range(requests)))


def test_overload_gets_503_and_the_server_stays_up(server):
    """max_ongoing_requests 1, max_queued_requests 1: most of a burst is refused at once; the
    default limits (32 and 64) take the same burst."""
    codes = burst(server + "/tight")
    assert set(codes) <= {200, 503} and codes.count(200) >= 1 and codes.count(503) >= 4, codes
    assert httpx.get(f"{server}/tight/health").json()["running"] == 0
    assert burst(server) == [200] * 8


def test_replicas_model_id_default_max_tokens_and_threads(server):
    """The strict app runs 2 replicas with 2 torch threads; the tight one names its model and
    completes 5 tokens when max_tokens is left out (the main one: 16)."""
    replicas = {httpx.get(f"{server}/strict/health").json()["replica"] for _ in range(30)}
    assert len(replicas) == 2
    assert httpx.get(f"{server}/strict/health").json()["torch_threads"] == 2
    assert httpx.get(f"{server}/health").json()["torch_threads"] == 1
    assert httpx.get(f"{server}/tight/v1/models").json()["data"][0]["id"] == "tight-model"
    for url, n in ((server + "/tight", 5), (server, 16)):  # 16: OpenAI's default
        out = post(url, {"prompt": "To be", "temperature": 0}).json()
        # Greedy, "To be" runs past 16 tokens without end-of-text: max_tokens is what stops it.
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == n, out


def health_of_replicas(url: str, replicas: int) -> dict:
    """/health of each of an app's replicas (a request reaches one of them at a time)."""
    seen = {}
    for _ in range(100):
        health = httpx.get(f"{url}/health").json()
        seen[health["replica"]] = health
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"saw {len(seen)} of {replicas} replicas")


def idle_tokens(url: str, replicas: int = 1) -> int:
    """Tokens generated by the app's replicas, once none of them has work left."""
    for _ in range(200):
        seen = health_of_replicas(url, replicas)
        if all(h["running"] == 0 and h["waiting"] == 0 for h in seen.values()):
            return sum(h["tokens_generated"] for h in seen.values())
        time.sleep(0.05)
    raise AssertionError(f"rows still busy: {seen}")


def test_time_limit_gets_408_and_stops_generating(server):
    before = idle_tokens(server + "/strict", replicas=2)
    r = post(server + "/strict", {"prompt": "To be", "max_tokens": 50})
    assert r.status_code == 408 and "request_timeout_s" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{server}/strict/v1/completions", json={"prompt": "To be", "max_tokens": 50,
                                                                       "stream": True}, timeout=30) as s:
        events = [line for line in s.iter_lines() if line]
    assert "request_timeout_s" in events[-2] and events[-1] == "data: [DONE]"
    assert idle_tokens(server + "/strict", replicas=2) - before < 50  # both cut short: far from 2 x 50
    assert post(server, {"prompt": "To be", "max_tokens": 50}).status_code == 200  # the default limit: 120 s


def test_a_client_that_goes_away_stops_its_generation(server):
    before = idle_tokens(server)
    with httpx.stream("POST", f"{server}/v1/completions", json={"prompt": "To be", "max_tokens": 58, "n": 4,
                                                                "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        next(s.iter_lines())
    assert idle_tokens(server) - before < 4 * 58 // 2  # the 4 choices stopped well before their 58 tokens


def test_server_binds_loopback_only(server):
    import psutil

    port = int(server.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_playground_streams_into_the_page(server, tmp_path):
    """Headless Chromium (Debian's package) types a prompt and waits for streamed text."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: `make test` installs Debian's package"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('run served')")
        page.fill("#prompt", "JULIET:")
        page.fill("#max_tokens", "40")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_function("document.getElementById('completion').textContent.length > 0")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
        text = page.text_content("#completion")
        page.screenshot(path=str(tmp_path / "playground.png"))
        browser.close()
    expected = post(server, {"prompt": "JULIET:", "max_tokens": 40, "temperature": 0.8, "top_p": 0.95, "top_k": 50,
                             "seed": 1}).json()["choices"][0]["text"]
    assert text == expected and (tmp_path / "playground.png").stat().st_size > 5000


def wait_for(url: str, proc, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not come up in {seconds} s")


def stop(proc) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_serve_config_file_serves_the_checkpoint(trained, tmp_path):
    """`serve run jobs/serve_config.yaml` on a Ray of its own started by the command, as a user runs it.
    (`llm-ray serve --run` as a user runs it: tests/test_processes.py.)"""
    _, choice = trained
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (tmp_path / "serve.log").open("w")
    config = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    config["applications"][0]["args"].update(checkpoint=str(choice.model_dir), cpus_per_replica=0.5)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parents[1])
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc)
        assert post(f"http://127.0.0.1:{port}", {"prompt": "To be", "max_tokens": 3}).status_code == 200
        card = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]
        assert card["provenance"]["checkpoint"] == str(choice.model_dir)
    finally:
        stop(proc)
