"""The tools users already have, against the served debug checkpoint on 127.0.0.1: lm-eval-harness
(its `local-completions` model over HTTP, and its `hf` model on an `llm-ray export` folder) and
the OpenAI client's chat API. Expected values come from the checkpoint, scored in this process."""

import json
from pathlib import Path

import httpx
import pytest
import torch

from llm_ray.checkpoint import load_model
from llm_ray.config.serve import ServeConfig
from llm_ray.serve.chat import PLAIN_TEMPLATE
from llm_ray.serve.launch import start
from tests.conftest import CORPUS, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TASK = "llm_ray_local_mc"
CUSTOM_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def server(trained):
    """Two apps on one Serve: the main one (plain chat template, prefill in chunks of 16 tokens)
    and one with a chat template from the config and at most 2 alternatives per token."""
    from ray import serve

    _, choice = trained
    common = dict(checkpoint=str(choice.model_dir), port=free_port(), cpus_per_replica=0.1, torch_threads=1)
    url = start(ServeConfig(**common, max_batch_size=8, stream_interval_ms=0, prefill_chunk_tokens=16), name="main")
    start(ServeConfig(**common, route_prefix="/templated", chat_template=CUSTOM_TEMPLATE, limits={"max_logprobs": 2}),
          name="templated")
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def checkpoint(trained):
    model, tokenizer, _ = load_model(trained[1].model_dir)
    return model, tokenizer


def local_task(folder: Path) -> Path:
    """A multiple-choice task from a local JSONL file (no hub download): the first five words of a
    line of the corpus, and four three-word endings, its own first."""
    lines = [ln.split() for f in sorted(CORPUS.glob("*.txt")) for ln in f.read_text().splitlines()]
    lines = [ln for ln in lines if len(ln) >= 8][:40:5]
    docs = [{"context": " ".join(ln[:5]), "choices": [" ".join(other[5:8]) for other in (ln, *[
        lines[(i + k) % len(lines)] for k in (1, 2, 3)])], "label": 0} for i, ln in enumerate(lines)]
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    return folder


def lm_eval(model: str, model_args: dict, task_dir: Path) -> tuple[dict, list]:
    """(accuracy, ((context, continuation), log-likelihood) of every request) from lm-eval's Python API."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                              task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0)
    scored = [(tuple(args), resp[0][0]) for sample in results["samples"][TASK]
              for args, resp in zip(sample["arguments"], sample["resps"])]
    return results["results"][TASK]["acc,none"], scored


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The continuation's log-likelihood from a plain forward pass of the checkpoint, split into
    tokens as lm-eval does (trailing spaces of the context move to the continuation; the pair is
    encoded whole and the context's tokens cut off)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    ctx = tokenizer.encode(context).ids
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole]))
    logp = logits[0].double().log_softmax(-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory):
    """lm-eval's datasets cache in a temporary folder, and no network."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield local_task(tmp_path_factory.mktemp("lm-eval-task"))
    mp.undo()


@pytest.fixture(scope="module")
def served_scores(server, lm_eval_env):
    """lm-eval's local-completions against the server, tokenizing through its /tokenize route."""
    return lm_eval("local-completions", {"base_url": f"{server}/v1/completions", "model": "served",
                                         "max_length": 64, "num_concurrent": 1}, lm_eval_env)


def test_lm_eval_scores_the_served_model_like_the_checkpoint(served_scores, checkpoint, capsys):
    acc, scored = served_scores
    assert len(scored) == 32  # 8 questions, 4 choices each
    for (context, continuation), ll in scored:
        assert ll == pytest.approx(direct_loglikelihood(*checkpoint, context, continuation), abs=1e-4)
    with capsys.disabled():
        print(f"\nlm-eval local-completions: acc {acc:.3f}, summed log-likelihood {sum(ll for _, ll in scored):.4f}")


def test_lm_eval_hf_on_the_export_gives_the_same_numbers(served_scores, trained, lm_eval_env, tmp_path, capsys):
    from llm_ray.export.hf import export_hf

    export = export_hf(trained[1].model_dir, tmp_path / "hf")
    acc, scored = lm_eval("hf", {"pretrained": str(export), "dtype": "float32", "device": "cpu"}, lm_eval_env)
    served_acc, served = served_scores
    assert [args for args, _ in scored] == [args for args, _ in served]
    for (_, ll), (_, want) in zip(scored, served):
        assert ll == pytest.approx(want, abs=1e-4)
    assert acc == served_acc
    with capsys.disabled():
        print(f"\nlm-eval hf on the export: acc {acc:.3f}, summed log-likelihood {sum(ll for _, ll in scored):.4f}")


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_completion_logprobs_echo_and_token_prompts(server, checkpoint):
    """echo with max_tokens 0 scores a token-id prompt (the first token has no log-probability);
    a text prompt with logprobs 3 gives the chosen token and at most 4 alternatives per token,
    and the streamed pieces put together equal the whole response."""
    model, tokenizer = checkpoint
    ids = tokenizer.encode("ROMEO: What light").ids
    body = post(server, "/v1/completions", {"prompt": [ids, ids[:3]], "max_tokens": 0, "logprobs": 0,
                                            "echo": True}).json()
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    want = logits[0, :-1].double().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    first = body["choices"][0]
    assert first["text"] == "ROMEO: What light" and first["finish_reason"] == "length"
    assert first["logprobs"]["token_logprobs"][0] is None
    assert torch.allclose(torch.tensor(first["logprobs"]["token_logprobs"][1:], dtype=torch.double), want, atol=1e-4)
    assert [tokenizer.decode([i]) for i in ids] == first["logprobs"]["tokens"]
    assert body["choices"][1]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        first["logprobs"]["token_logprobs"][1:3], abs=1e-5)
    assert body["usage"] == {"prompt_tokens": len(ids) + 3, "completion_tokens": 0, "total_tokens": len(ids) + 3}

    request = {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    whole = post(server, "/v1/completions", request).json()["choices"][0]
    lp = whole["logprobs"]
    assert whole["text"].startswith("ROMEO:") and len(lp["tokens"]) == len(tokenizer.encode("ROMEO:").ids) + 6
    assert [whole["text"][o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    for token, logprob, top in zip(lp["tokens"][-6:], lp["token_logprobs"][-6:], lp["top_logprobs"][-6:]):
        assert len(top) <= 4 and top[token] == logprob == max(top.values())  # greedy: the chosen is the best
    with httpx.stream("POST", f"{server}/v1/completions", json={**request, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == lp["tokens"]
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == lp["text_offset"]


def test_chat_completions_with_the_openai_client(server, checkpoint):
    from openai import BadRequestError, OpenAI, UnprocessableEntityError

    _, tokenizer = checkpoint
    client = OpenAI(base_url=f"{server}/v1", api_key="not-needed")
    messages = [{"role": "system", "content": "Speak as in a play."}, {"role": "user", "content": "Who is there?"}]
    rendered = "system: Speak as in a play.\nuser: Who is there?\nassistant:"
    out = client.chat.completions.create(model="served", messages=messages, max_tokens=12, temperature=0)
    direct = client.completions.create(model="served", prompt=rendered, max_tokens=12, temperature=0,
                                       stop=["\nuser:"])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == direct.choices[0].text
    assert out.choices[0].finish_reason == direct.choices[0].finish_reason
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered).ids) == direct.usage.prompt_tokens
    assert out.usage.completion_tokens == direct.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="served", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    scored = client.chat.completions.create(model="served", messages=messages, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert "".join(c.token for c in content) == scored.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    with pytest.raises(BadRequestError, match="max_tokens: 10000 is over this server's limit of 512"):
        client.chat.completions.create(model="served", messages=messages, max_tokens=10_000)
    with pytest.raises(UnprocessableEntityError, match="tools: unknown or unsupported field"):
        client.chat.completions.create(model="served", messages=messages, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}])
    with pytest.raises(UnprocessableEntityError, match="messages.0.role"):
        client.chat.completions.create(model="served", messages=[{"role": "tool", "content": "x",
                                                                  "tool_call_id": "1"}])
    with pytest.raises(BadRequestError, match="exceeds the model's context of 64 tokens"):
        client.chat.completions.create(model="served", messages=[{"role": "user", "content": "word " * 60}])


def test_the_chat_template_comes_from_the_config_and_the_tokenizer_info(server, checkpoint):
    """The templated app renders with the config's template: its prompt is that template's text."""
    _, tokenizer = checkpoint
    messages = [{"role": "user", "content": "Who is there?"}]
    plain = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    custom = post(server, "/templated/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert plain["usage"]["prompt_tokens"] == len(tokenizer.encode("user: Who is there?\nassistant:").ids)
    assert custom["usage"]["prompt_tokens"] == len(tokenizer.encode("<user>Who is there?<assistant>").ids)
    assert httpx.get(f"{server}/tokenizer_info").json()["chat_template"] == PLAIN_TEMPLATE
    assert httpx.get(f"{server}/templated/tokenizer_info").json()["chat_template"] == CUSTOM_TEMPLATE
    tokens = post(server, "/tokenize", {"prompt": "Who is there?"}).json()
    assert tokens["tokens"] == tokenizer.encode("Who is there?").ids and tokens["max_model_len"] == 64
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"] == "Who is there?"


def test_ingress_on_a_running_ray_is_the_proxy_and_direct_is_refused(server, trained):
    """On a Ray that was running before (the tests' own), ingress auto serves through Serve's proxy;
    ingress direct is refused, naming the field (its setting reaches only a Ray started with it).
    Direct ingress, on a Ray `llm-ray serve` starts: tests/test_processes.py."""
    from llm_ray.config import ConfigError

    assert httpx.get(f"{server}/health").json()["ingress"] == "proxy"
    with pytest.raises(ConfigError, match="ingress: direct needs a Ray that llm-ray serve starts"):
        start(ServeConfig(checkpoint=str(trained[1].model_dir), port=free_port(), ingress="direct"), name="direct")


def test_max_logprobs_caps_the_alternatives_a_request_may_ask_for(server):
    """limits.max_logprobs 2 on the templated app: 2 alternatives are served, 3 get 400 naming the field,
    in both APIs; the main app's default (20) serves 3."""
    messages = [{"role": "user", "content": "Who is there?"}]
    ok = post(server, "/templated/v1/completions", {"prompt": "To be", "max_tokens": 2, "logprobs": 2}).json()
    assert all(len(top) <= 3 for top in ok["choices"][0]["logprobs"]["top_logprobs"])  # 2 and the chosen one
    for path, body in (("/v1/completions", {"prompt": "To be", "max_tokens": 2, "logprobs": 3}),
                       ("/v1/chat/completions", {"messages": messages, "max_tokens": 2, "logprobs": True,
                                                 "top_logprobs": 3})):
        refused = post(server, f"/templated{path}", body)
        assert refused.status_code == 400 and "logprobs: 3 is over this server's limit of 2" in refused.text
        assert post(server, path, body).status_code == 200
