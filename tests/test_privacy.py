"""Redaction in prepare (cleaning.pii): planted personal data never reaches the packed shards, is
counted in the report, and turning it off reruns the documents stage and lets the items through."""

import json
import shutil

import numpy as np
import pytest

from llm_ray.config import load_config
from llm_ray.data.prepare import data_dir, prepare
from tests.conftest import CORPUS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLANTED = {"email": "jane.doe@example.org", "phone": "+1 (555) 123-4567", "card": "4539 1488 0343 6467",
           "secret": "AKIAIOSFODNN7EXAMPLE", "ip": "10.20.30.40"}
LINE = ("Letters to {email}, or call {phone}; the card {card} paid for it; key {secret} on host {ip}.\n"
        .format(**PLANTED))


class Log(list):
    def __call__(self, line):
        self.append(line)

    def has(self, fragment):
        return any(fragment in line for line in self)


def planted_corpus(folder):
    shutil.copytree(CORPUS, folder)
    for i, path in enumerate(sorted(folder.glob("play_*.txt"))):
        if i % 2 == 0:  # half the plays carry a line of personal data in the middle
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(lines[: len(lines) // 2] + [LINE] + lines[len(lines) // 2:]))
    # a document that is mostly personal data: dropped, not redacted into a list of placeholders
    (folder / "contacts.txt").write_text("".join(f"name{i}.surname@example.com +44 20 7946 {1000 + i:04d}\n"
                                                 for i in range(60)))
    return folder


def decoded(cfg, manifest) -> str:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(data_dir(cfg).local() / "tokenizer" / "tokenizer.json"))
    texts = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            blocks = np.load(data_dir(cfg).local() / shard["file"]).astype(np.int64)
            texts.append(tokenizer.decode(np.concatenate([blocks[:, :-1].ravel(), blocks[-1:, -1]]).tolist(),
                                          skip_special_tokens=True))
    return "\n".join(texts)


def test_planted_personal_data_is_redacted_counted_and_comes_back_only_when_turned_off(ray_session, tmp_path):
    corpus = planted_corpus(tmp_path / "corpus")
    overrides = [f"output_dir={tmp_path}", f"data.sources={json.dumps([str(corpus)])}", "data.max_files=null"]
    cfg = load_config("debug", overrides)
    manifest = prepare(cfg, log=Log())
    text = decoded(cfg, manifest)
    for kind, item in PLANTED.items():
        assert item not in text, kind
        assert f"<{kind.upper()}>" in text, kind
    assert "@example.com" not in text
    report = json.loads((data_dir(cfg).local() / "prepare_report.json").read_text())
    planted_in = sum(1 for i, _ in enumerate(sorted(CORPUS.glob("play_*.txt"))) if i % 2 == 0)
    assert report["pii"]["redacted"]["email"] >= planted_in + 60  # the contacts file was scanned, then dropped
    assert report["pii"]["redacted"]["card"] == planted_in and report["pii"]["documents"] == planted_in + 1
    assert report["drops"]["pii"] == 1
    assert 0 < len(report["pii"]["examples"]) <= 5
    assert all("<" in e and not any(item in e for item in PLANTED.values()) for e in report["pii"]["examples"])
    assert "redacted: " in report["table"]
    md = (data_dir(cfg).local() / "prepare_report.md").read_text()
    assert "Redacted personal data" in md and PLANTED["email"] not in md

    log = Log()
    off = load_config("debug", [*overrides, "cleaning.pii.enabled=false"])
    manifest = prepare(off, log=log)
    assert not log.has("documents: up to date")  # the stage key covers the setting
    text = decoded(off, manifest)
    assert PLANTED["email"] in text and PLANTED["secret"] in text
