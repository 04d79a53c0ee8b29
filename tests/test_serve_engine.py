"""The built-in generator without Ray: continuous batching, seeds, stops, n, limits."""

import pytest
import torch

from llm_ray.data.tokenizer import EOT, train_bpe
from llm_ray.model import GPT, GPTSpec
from llm_ray.serve.engine import Engine, Sampling
from llm_ray.serve.text import TextStream

TEXT = ["the quick brown fox jumps over the lazy dog. " * 3, "to be, or not to be: that is the question. " * 3,
        "a stitch in time saves nine; all that glitters is not gold. " * 3]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXT, vocab_size=300, min_frequency=1, sample_bytes=1 << 20)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    spec = GPTSpec(vocab_size=tokenizer.get_vocab_size(), context_length=64, n_layer=2, n_head=4, n_embd=32,
                   pos_encoding="rope")
    return GPT(spec).eval()


def engine(model, tokenizer, batch=4, eos=None):
    return Engine(model, tokenizer, eos_id=tokenizer.token_to_id(EOT) if eos is None else eos, max_batch_size=batch)


def ids(tokenizer, text):
    return tokenizer.encode(text).ids


SETTINGS = [Sampling(max_tokens=12, temperature=0), Sampling(max_tokens=20, temperature=0.9, seed=1),
            Sampling(max_tokens=7, temperature=1.0, top_k=20, seed=2), Sampling(max_tokens=15, top_p=0.8, seed=3),
            Sampling(max_tokens=9, temperature=0.7, top_k=50, top_p=0.9, seed=4, n=2),
            Sampling(max_tokens=25, temperature=0, n=1)]
PROMPTS = ["the quick", "to be, or not to be", "a", "all that glitters is", "the lazy dog. the", "question"]


def test_batched_output_equals_unbatched(model, tokenizer):
    """Six requests (seven sequences) through four rows, joining as rows free up, give what each
    request gives alone."""
    prompts = [ids(tokenizer, p) for p in PROMPTS]
    together = engine(model, tokenizer, batch=4).generate(prompts, SETTINGS)
    alone = [engine(model, tokenizer, batch=2).generate([p], s)[0] for p, s in zip(prompts, SETTINGS)]
    assert [c.texts for c in together] == [c.texts for c in alone]
    assert [c.finish_reasons for c in together] == [c.finish_reasons for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    assert together[0].finish_reasons == ["length"] and together[0].completion_tokens == 12
    assert together[4].texts[0] != together[4].texts[1]  # n = 2: two different samples


def test_requests_join_and_leave_at_every_step(model, tokenizer):
    """Two rows: the third request starts as soon as the short one ends, while the long one runs."""
    events = []
    e = engine(model, tokenizer, batch=2, eos=-1)
    for name, n in (("long", 12), ("short", 2), ("late", 3)):
        e.submit(ids(tokenizer, "to be"), Sampling(max_tokens=n, temperature=0),
                 lambda i, text, finish, lps, name=name: events.append((name, finish)))
    while e.busy:
        e.step()
    order = [name for name, finish in events if finish]
    assert order == ["short", "late", "long"]
    assert sorted(e.free) == [0, 1]


def test_seeds_and_n(model, tokenizer):
    prompt = ids(tokenizer, "the quick")
    e = engine(model, tokenizer)
    three = e.generate([prompt], Sampling(max_tokens=10, seed=5, n=3))[0]
    singles = [e.generate([prompt], Sampling(max_tokens=10, seed=5 + i))[0].texts[0] for i in range(3)]
    assert three.texts == singles  # choice i draws with seed + i
    assert len(set(three.texts)) == 3
    assert e.generate([prompt], Sampling(max_tokens=10, seed=6))[0].texts[0] != singles[0]


def test_stop_sequences_cut_the_text(model, tokenizer):
    prompt = ids(tokenizer, "to be")
    e = engine(model, tokenizer, eos=-1)
    full = e.generate([prompt], Sampling(max_tokens=40, temperature=0))[0].texts[0]
    stop = full[10:13]
    cut = e.generate([prompt], Sampling(max_tokens=40, temperature=0, stop=("@@@", stop)))[0]
    assert cut.texts[0] == full[: full.index(stop)] and cut.finish_reasons == ["stop"]
    assert cut.completion_tokens < 40


def test_end_of_text_finishes(model, tokenizer):
    prompt = ids(tokenizer, "to be")
    first = engine(model, tokenizer, eos=-1).generate([prompt], Sampling(max_tokens=1, temperature=0))[0]
    token = ids(tokenizer, first.texts[0])[0]
    out = engine(model, tokenizer, eos=token).generate([prompt], Sampling(max_tokens=20, temperature=0))[0]
    assert out.finish_reasons == ["stop"] and out.texts == [""] and out.completion_tokens == 1


def test_context_and_batch_limits(model, tokenizer):
    e = engine(model, tokenizer, batch=2)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        e.submit([1] * 60, Sampling(max_tokens=5), lambda *a: None)
    with pytest.raises(ValueError, match="batch size"):
        e.submit([1], Sampling(n=3), lambda *a: None)


def test_cancelled_requests_free_their_rows(model, tokenizer):
    e = engine(model, tokenizer, batch=2, eos=-1)
    got = []
    r = e.submit(ids(tokenizer, "to be"), Sampling(max_tokens=30, n=2), lambda *a: got.append(a))
    e.step()
    assert len(e.running) == 2
    r.cancel()
    e.step()
    assert not e.running and sorted(e.free) == [0, 1] and r.done.is_set()


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tokenizer):
    text = "héllo wörld 你好 and then END of it"
    stream = TextStream(tokenizer, stop=("END",))
    pieces = [stream.add(t) for t in ids(tokenizer, text)]
    assert "".join(pieces) == "héllo wörld 你好 and then "
    assert stream.stopped and all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # the bytes of 你 and 好 arrive over several tokens
    plain = TextStream(tokenizer)
    assert "".join(plain.add(t) for t in ids(tokenizer, text)) + plain.flush() == text


def test_a_tiny_temperature_is_greedy_not_an_error(model, tokenizer):
    prompt = ids(tokenizer, "to be")
    e = engine(model, tokenizer)
    greedy = e.generate([prompt], Sampling(max_tokens=10, temperature=0))[0]
    for t in (1e-40, 5e-324):
        assert e.generate([prompt], Sampling(max_tokens=10, temperature=t, seed=1))[0].texts == greedy.texts


def test_a_choice_that_ends_at_once_does_not_end_its_request(model, tokenizer):
    prompt = ids(tokenizer, "to be")
    seed = next(s for s in range(100) if len(set(engine(model, tokenizer, eos=-1).generate(
        [prompt], Sampling(max_tokens=1, seed=s, n=2))[0].texts)) == 2)  # the two choices start differently
    first = engine(model, tokenizer, eos=-1).generate([prompt], Sampling(max_tokens=1, seed=seed, n=2))[0].texts[0]
    out = engine(model, tokenizer, eos=ids(tokenizer, first)[0]).generate(
        [prompt], Sampling(max_tokens=10, seed=seed, n=2))[0]
    assert out.texts[0] == "" and out.finish_reasons[0] == "stop"
    assert out.finish_reasons[1] in ("stop", "length") and out.texts[1]


def test_a_failing_request_fails_alone(model, tokenizer, monkeypatch):
    """A prefill that fails (as one running out of memory would) ends that request with "error";
    the request decoding beside it is untouched. A prompt id past the vocabulary is refused."""
    e = engine(model, tokenizer)
    good = Sampling(max_tokens=12, temperature=0)
    alone = e.generate([ids(tokenizer, "to be")], good)[0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.submit([10**6], good, lambda *a: None)
    poison = ids(tokenizer, "glitters")
    forward = type(model).forward

    def failing(self, idx, *args, **kwargs):
        if idx.shape[1] == len(poison) and idx[0].tolist() == poison:
            raise RuntimeError("out of memory (simulated)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", failing)
    both = e.generate([ids(tokenizer, "to be"), poison], [good, Sampling(max_tokens=5)])
    assert both[0].texts == alone.texts and both[1].finish_reasons == ["error"]
    assert sorted(e.free) == [0, 1, 2, 3]


def direct_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(token t | tokens before it) for t = 1..T-1, from one plain forward pass (no cache)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return logits[0, :-1].float().log_softmax(-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def test_logprobs_of_generated_and_echoed_tokens_match_a_plain_forward_pass(model, tokenizer):
    prompt = ids(tokenizer, "to be, or not to be")
    out = engine(model, tokenizer, eos=-1).generate([prompt], Sampling(max_tokens=8, temperature=0, logprobs=3,
                                                                       echo=True))[0]
    generated = [lp.token for lp in out.logprobs[0]]
    assert tokenizer.decode(generated) == out.texts[0] and len(generated) == 8
    expected = direct_logprobs(model, prompt + generated)
    got = [lp.logprob for lp in out.prompt_logprobs[1:]] + [lp.logprob for lp in out.logprobs[0]]
    assert out.prompt_logprobs[0] is None and len(got) == len(expected)
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5)
    for lp in out.logprobs[0]:  # greedy: the chosen token is the most likely, and the top 3 are sorted
        assert len(lp.top) == 3 and lp.top[0] == (lp.token, pytest.approx(lp.logprob))
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    plain = engine(model, tokenizer, eos=-1).generate([prompt], Sampling(max_tokens=8, temperature=0))[0]
    assert plain.texts == out.texts and plain.logprobs == [] and plain.prompt_logprobs is None


def test_max_tokens_zero_scores_the_prompt_alone(model, tokenizer):
    prompts = [ids(tokenizer, "all that glitters is not gold"), ids(tokenizer, "the lazy dog")]
    e = engine(model, tokenizer)
    out = e.generate(prompts, Sampling(max_tokens=0, logprobs=0, echo=True))
    for prompt, c in zip(prompts, out):
        assert c.texts == [""] and c.finish_reasons == ["length"] and c.completion_tokens == 0
        got = torch.tensor([lp.logprob for lp in c.prompt_logprobs[1:]])
        assert torch.allclose(got, direct_logprobs(model, prompt), atol=1e-5)
        assert all(lp.top == () for lp in c.prompt_logprobs[1:])
    assert sorted(e.free) == [0, 1, 2, 3] and not e.busy


def test_chunked_prefill_gives_the_same_output_and_lets_running_streams_go_on(model, tokenizer):
    """A 50-token prompt in chunks of 8 takes 7 steps, during which a running request gets a token
    per step; its output and its prompt's log-probabilities equal an unchunked prefill's."""
    long_prompt = (ids(tokenizer, TEXT[2]) * 4)[:50]
    settings = Sampling(max_tokens=10, temperature=0, logprobs=2, echo=True)
    whole = engine(model, tokenizer, eos=-1).generate([long_prompt], settings)[0]
    for chunk, steps_expected in ((8, 7), (None, 1)):
        e = Engine(model, tokenizer, eos_id=-1, max_batch_size=4, prefill_chunk=chunk)
        tokens_of_running = []
        e.submit(ids(tokenizer, "to be"), Sampling(max_tokens=40, temperature=0),
                 lambda i, text, finish, lps: tokens_of_running.append(text))
        e.step()  # the running request is prefilled and has its first token
        texts = []
        request = e.submit(long_prompt, settings, lambda i, text, finish, lps: texts.append((text, lps)))
        steps, before = 0, e.tokens_generated
        while not texts:
            e.step()
            steps += 1
        assert steps == steps_expected
        assert e.tokens_generated - before == steps + 1  # the running row decoded at every step, then the new one
        while e.busy:
            e.step()
        request_logprobs = [lp for _, lps in texts for lp in lps]
        assert "".join(t for t, _ in texts) == whole.texts[0]
        assert [lp.token for lp in request_logprobs] == [lp.token for lp in whole.logprobs[0]]
        chunked = torch.tensor([lp.logprob for lp in request.prompt_logprobs[1:]])
        assert len(request.prompt_logprobs) == len(long_prompt)
        assert torch.allclose(chunked, torch.tensor([lp.logprob for lp in whole.prompt_logprobs[1:]]), atol=1e-5)
        assert sorted(e.free) == [0, 1, 2, 3]
