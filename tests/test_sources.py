import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_ray.config import DataConfig, S3Config
from llm_ray.data.corpus import CorpusError
from llm_ray.data.sources import FileRef, ReadError, check_uri, iter_documents, list_sources
from tests._s3_proxy import S3Proxy
from tests.conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY


@dataclass
class FileResult:
    """What one file gave: documents as (doc_key, text), the reason it stopped, plus counters."""

    uri: str
    docs: list = field(default_factory=list)
    error: str | None = None
    counts: Counter = field(default_factory=Counter)


def read_file(ref, data: DataConfig) -> FileResult:
    """Every document of one file in memory, the way the tests look at a file (the pipeline streams)."""
    result = FileResult(ref.uri if isinstance(ref, FileRef) else ref)
    try:
        for doc in iter_documents(result.uri, data, result.counts):
            result.docs.append(doc)
    except ReadError as e:
        result.error = str(e)
    return result


@pytest.mark.parametrize("uri", ["http://example.com/a.txt", "file:///etc/passwd", "gs://b/x", "s3://",
                                 "s3://bucket/../other/x", "s3://bucket/a/./b", "s3://user@bucket/x",
                                 "s3://bucket/x?versionId=1", "builtin:nope", "s3://../x", "s3://./x",
                                 "s3://Bucket/x", "s3://a/x", "s3://-bucket/x", "s3://b..c/x"])
def test_bad_uris_are_rejected_before_any_io(uri):
    with pytest.raises(CorpusError, match="data.sources"):
        check_uri(uri)


def test_listing_local_sources(tmp_path, corpus_dir):
    refs = list_sources([str(corpus_dir)], DataConfig())
    assert len(refs) == 15 and [r.uri for r in refs] == sorted(r.uri for r in refs)
    assert len(list_sources([str(corpus_dir / "play_0*.txt")], DataConfig())) == 10
    (tmp_path / "notes.md").write_text("not a corpus file")
    for bad, message in [(str(tmp_path / "nope.txt"), "does not exist"), (str(tmp_path), "holds no")]:
        with pytest.raises(CorpusError, match=message):
            list_sources([bad], DataConfig())


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_formats(tmp_path):
    data = DataConfig()
    assert read_file(write(tmp_path / "a.txt", "one document\nover two lines".encode()), data).docs == [
        (str(tmp_path / "a.txt"), "one document\nover two lines")]
    lines = DataConfig(txt_mode="line")
    assert [t for _, t in read_file(write(tmp_path / "b.txt", b"first\n\nsecond\n"), lines).docs] == ["first", "second"]
    jsonl = b'{"text": "alpha"}\n{"text": "beta", "id": 2}\n'
    assert [t for _, t in read_file(write(tmp_path / "c.jsonl", jsonl), data).docs] == ["alpha", "beta"]
    assert [t for _, t in read_file(write(tmp_path / "d.json.gz", gzip.compress(jsonl)), data).docs] == ["alpha", "beta"]
    assert [t for _, t in read_file(write(tmp_path / "e.txt.gz", gzip.compress(b"zipped")), data).docs] == ["zipped"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["p1", "p2"], "n": [1, 2]}), buf)
    assert [t for _, t in read_file(write(tmp_path / "f.parquet", buf.getvalue()), DataConfig(text_field="body")).docs] \
        == ["p1", "p2"]
    result = read_file(write(tmp_path / "g.parquet", buf.getvalue()), data)
    assert result.error == "no column 'text' (data.text_field)"
    keys = [k for k, _ in read_file(str(tmp_path / "c.jsonl"), data).docs]
    assert keys == [f"{tmp_path / 'c.jsonl'}:1", f"{tmp_path / 'c.jsonl'}:2"]


def test_bad_inputs_are_named_not_raised(tmp_path):
    data = DataConfig()
    bad_utf8 = write(tmp_path / "latin1.txt", "café crème".encode("latin-1"))
    replaced = read_file(bad_utf8, data)
    assert replaced.docs[0][1] == "caf\ufffd cr\ufffdme" and replaced.counts["invalid_utf8_replaced"] == 1
    dropped = read_file(bad_utf8, DataConfig(invalid_utf8="drop"))
    assert dropped.docs == [] and dropped.counts["invalid_utf8_dropped"] == 1 and dropped.error is None

    assert read_file(write(tmp_path / "empty.txt", b"  \n"), data).counts["empty_file"] == 1
    whole = gzip.compress(b"x" * 100000)
    assert "truncated or corrupt gzip" in read_file(write(tmp_path / "cut.txt.gz", whole[: len(whole) // 2]), data).error
    assert read_file(write(tmp_path / "blob.txt", b"\x7fELF\x00\x00\x01binary"), data).error.startswith("binary")
    assert read_file(str(tmp_path / "vanished.txt"), data).error.startswith("vanished")
    long_line = read_file(write(tmp_path / "long.txt", b"word " * 2_000_000), data)  # a 10 MB single line
    assert len(long_line.docs) == 1 and len(long_line.docs[0][1]) == 10_000_000
    messy = b'{"text": "ok"}\nnot json\n{"other": 1}\n[1, 2]\n'
    result = read_file(write(tmp_path / "messy.jsonl", messy), data)
    assert [t for _, t in result.docs] == ["ok"]
    assert result.counts == {"invalid_json_line": 1, "missing_text_field": 2}


# ------------------------------------------------------------- S3 (moto server on 127.0.0.1)


@pytest.fixture(scope="module")
def bucket(s3_server):
    endpoint, client = s3_server
    client.create_bucket(Bucket="corpus")
    client.put_object(Bucket="corpus", Key="raw/a.txt", Body=b"a plain text document")
    client.put_object(Bucket="corpus", Key="raw/sub/b.jsonl.gz",
                      Body=gzip.compress(json.dumps({"text": "from gzip jsonl"}).encode() + b"\n"))
    client.put_object(Bucket="corpus", Key="raw/skip.bin", Body=b"\x00\x01")
    return endpoint


def s3_data(endpoint: str) -> DataConfig:
    return DataConfig(s3=S3Config(endpoint_url=endpoint, max_attempts=2, connect_timeout_s=1, request_timeout_s=5))


def test_s3_listing_and_reading(bucket):
    data = s3_data(bucket)
    refs = list_sources(["s3://corpus/raw/"], data)
    assert [r.uri for r in refs] == ["s3://corpus/raw/a.txt", "s3://corpus/raw/sub/b.jsonl.gz"]
    assert read_file(refs[0], data).docs == [("s3://corpus/raw/a.txt", "a plain text document")]
    assert read_file(refs[1], data).docs[0][1] == "from gzip jsonl"
    assert list_sources(["s3://corpus/raw/a.txt"], data)[0].size == len("a plain text document")
    assert read_file("s3://corpus/raw/gone.txt", data).error.startswith("vanished")


def test_s3_errors_name_the_uri_and_no_secret(bucket):
    with pytest.raises(CorpusError) as err:
        list_sources(["s3://no-such-bucket/x/"], s3_data(bucket))
    assert "s3://no-such-bucket/x/" in str(err.value) and SECRET_ACCESS_KEY not in str(err.value)
    with pytest.raises(CorpusError) as err:
        list_sources(["s3://corpus/raw/"], s3_data("http://127.0.0.1:9"))  # nothing listens there
    assert "s3://corpus/raw/" in str(err.value) and "endpoint" in str(err.value)
    assert SECRET_ACCESS_KEY not in str(err.value)
    with pytest.raises(CorpusError, match="holds no"):
        list_sources(["s3://corpus/empty-prefix/"], s3_data(bucket))


def test_missing_credentials_fail_fast_naming_the_uri(bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CorpusError, match="no AWS credentials") as err:
        list_sources(["s3://corpus/raw/"], s3_data(bucket))
    assert "s3://corpus/raw/" in str(err.value)
    # A public bucket is read anonymously when the config says so.
    data = DataConfig(s3=S3Config(endpoint_url=bucket, anonymous=True, max_attempts=2))
    assert len(list_sources(["s3://corpus/raw/"], data)) == 2


def test_s3_503_replies_are_retried_with_backoff(bucket):
    proxy = S3Proxy(bucket, failures=2)
    try:
        data = DataConfig(s3=S3Config(endpoint_url=proxy.endpoint, max_attempts=4, request_timeout_s=10))
        refs = list_sources(["s3://corpus/raw/"], data)
        results = [read_file(r, data) for r in refs]
        assert [d for r in results for _, d in r.docs] == ["a plain text document", "from gzip jsonl"]
        assert all(r.error is None for r in results)
        assert proxy.throttled >= 4  # every object was throttled twice before it was served
        # More 503s in a row than data.s3.max_attempts: a named failure, not a crash or a hang.
        stingy = DataConfig(s3=S3Config(endpoint_url=proxy.endpoint, max_attempts=1))
        proxy.seen.clear()
        failed = read_file(refs[0], stingy)
        assert failed.error is not None and failed.error.startswith("unreadable") and not failed.docs
        assert SECRET_ACCESS_KEY not in failed.error and ACCESS_KEY_ID not in failed.error
    finally:
        proxy.close()


def test_a_failing_read_makes_at_most_max_attempts_requests(bucket):
    """One retry layer: the AWS SDK's, bounded by data.s3.max_attempts (a retry loop of our own around
    it made max_attempts^2 requests). What is transient comes from the reply's error code."""
    proxy = S3Proxy(bucket, failures=1000)  # every request to an object answers 503 SlowDown
    try:
        for attempts in (1, 3):
            proxy.seen.clear()
            data = DataConfig(s3=S3Config(endpoint_url=proxy.endpoint, max_attempts=attempts, request_timeout_s=10))
            failed = read_file("s3://corpus/raw/a.txt", data)
            assert sum(proxy.seen.values()) == attempts, proxy.seen
            assert "kept failing" in failed.error and "max_attempts" in failed.error
            assert SECRET_ACCESS_KEY not in failed.error
    finally:
        proxy.close()


# ------------------------------------------------------------- compressed and streamed formats


def test_every_compression_and_json_arrays(tmp_path):
    import bz2

    data = DataConfig()
    lines = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(3))
    expected = ["doc 0", "doc 1", "doc 2"]
    for suffix, pack in ((".jsonl.zst", None), (".jsonl.bz2", bz2.compress), (".json.gz", gzip.compress)):
        path = tmp_path / f"c{suffix}"
        if pack is None:  # zstd through pyarrow's own codec, as the crawls ship it
            with pa.output_stream(str(path), compression="zstd") as out:
                out.write(lines)
        else:
            path.write_bytes(pack(lines))
        assert [t for _, t in read_file(str(path), data).docs] == expected, suffix
    array = json.dumps([{"text": "first"}, {"other": 1}, {"text": "third, with ] and [ inside"}]).encode()
    result = read_file(write(tmp_path / "array.json", b"\n  " + array), data)
    assert [t for _, t in result.docs] == ["first", "third, with ] and [ inside"]
    assert result.counts["missing_text_field"] == 1 and result.error is None
    assert [k for k, _ in result.docs] == [f"{tmp_path / 'array.json'}:0", f"{tmp_path / 'array.json'}:2"]
    cut = read_file(write(tmp_path / "cut.json", array[:-20]), data)
    assert [t for _, t in cut.docs] == ["first"] and "JSON array" in cut.error  # what came before is kept


def test_json_array_elements_stream_across_blocks(tmp_path, monkeypatch):
    import llm_ray.data.sources as sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 7)  # every element crosses several reads
    texts = [f"document number {i} " + "é" * i for i in range(50)]
    path = write(tmp_path / "a.json", json.dumps([{"text": t} for t in texts], ensure_ascii=False).encode())
    assert [t for _, t in read_file(path, DataConfig()).docs] == texts
    lines = write(tmp_path / "b.jsonl", "\n".join(json.dumps({"text": t}) for t in texts).encode())
    assert [t for _, t in read_file(lines, DataConfig()).docs] == texts


def test_documents_larger_than_the_limit_are_skipped_and_counted(tmp_path):
    data = DataConfig(max_document_mb=0.001)  # 1,000 bytes
    big, small = "x" * 5000, "small one"
    result = read_file(write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": t}) for t in
                                                             (small, big, small)).encode()), data)
    assert [t for _, t in result.docs] == [small, small] and result.counts["document_too_large"] == 1
    assert [k.rsplit(":", 1)[1] for k, _ in result.docs] == ["1", "3"]  # line numbers stay true
    whole = read_file(write(tmp_path / "b.txt", big.encode()), data)
    assert whole.docs == [] and whole.counts["document_too_large"] == 1
    assert read_file(str(tmp_path / "b.txt"), DataConfig()).docs[0][1] == big  # the default keeps it


def test_iter_documents_streams(tmp_path):
    """Documents come out while the file is still being read: the first arrives before the stream ends."""
    path = tmp_path / "big.jsonl.zst"
    with pa.output_stream(str(path), compression="zstd") as out:
        for i in range(20000):
            out.write(json.dumps({"text": f"line {i} " + "word " * 40}).encode() + b"\n")
    from collections import Counter

    docs = iter_documents(str(path), DataConfig(), Counter())
    assert next(docs)[1].startswith("line 0 ")
    assert sum(1 for _ in docs) == 19999


def test_truncated_zstd_and_bz2_are_named_and_keep_what_came_before(tmp_path, monkeypatch):
    import bz2

    import llm_ray.data.sources as sources

    # pyarrow raises for a read that reaches the cut: what the reads before it gave is kept
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1 << 16)
    import random

    rng = random.Random(0)  # incompressible enough that half the archive holds many blocks
    lines = b"".join(json.dumps({"text": f"document {i} " + " ".join(f"{rng.getrandbits(40):x}" for _ in range(60))})
                     .encode() + b"\n" for i in range(3000))
    zst = tmp_path / "a.jsonl.zst"
    with pa.output_stream(str(zst), compression="zstd") as out:
        out.write(lines)
    whole = zst.read_bytes()
    zst.write_bytes(whole[: len(whole) // 2])
    packed = bz2.compress(lines)
    cut_bz2 = write(tmp_path / "b.jsonl.bz2", packed[: len(packed) // 2])
    for path, archive in ((str(zst), "zstd"), (cut_bz2, "bz2")):
        result = read_file(path, DataConfig())
        assert result.error.startswith(f"truncated or corrupt {archive}"), result.error
        assert 0 < len(result.docs) < 3000 and result.docs[0][1].startswith("document 0 ")


def test_long_lines_are_skipped_across_blocks_with_true_line_numbers(tmp_path, monkeypatch):
    import llm_ray.data.sources as sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 64)  # a long line spans many reads
    data = DataConfig(max_document_mb=0.0005)  # 500 bytes
    rows = ["short one", "x" * 2000, "short two", "y" * 499, "z" * 3000]
    result = read_file(write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": t}) for t in rows).encode()), data)
    assert [(k.rsplit(":", 1)[1], t) for k, t in result.docs] == [("1", "short one"), ("3", "short two")]
    assert result.counts["document_too_large"] == 3  # the 499-byte text is 511 bytes as a JSON line


def test_lines_that_json_cannot_take_are_counted_not_raised(tmp_path):
    rows = [json.dumps({"text": "fine"}), '{"text": "big", "n": ' + "9" * 5000 + "}", "[" * 100000, '{"text": "end"}']
    result = read_file(write(tmp_path / "a.jsonl", "\n".join(rows).encode()), DataConfig())
    assert [t for _, t in result.docs] == ["fine", "end"] and result.counts["invalid_json_line"] == 2


@pytest.mark.parametrize("message, reason", [
    ("AWS Error NO_SUCH_BUCKET during HeadObject operation: The specified bucket does not exist", "bucket does not"),
    ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", "access denied"),
    ("AWS Error INVALID_CLIENT_TOKEN_ID during ListObjectsV2 operation: The security token", "access denied"),
    ("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.", "access denied"),
    ("AWS Error REQUEST_TIME_TOO_SKEWED during GetObject operation: The difference", "clock"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect", "cannot connect"),
    ("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.", "kept failing"),
    ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: 500 ok", "kept failing (HTTP 503)"),
    ("AWS Error UNKNOWN (HTTP status 400) during GetObject operation", "malformed"),
    ("AWS Error UNKNOWN (HTTP status 404) during HeadObject operation: 503 in the key name", "no such object"),
])
def test_s3_errors_are_classified_by_their_code(message, reason):
    from llm_ray.storage import s3_error

    error = s3_error("s3://b/k", OSError(message), "data.sources")
    assert str(error).startswith("data.sources: s3://b/k: ") and reason in str(error), str(error)
