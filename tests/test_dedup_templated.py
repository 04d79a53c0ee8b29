"""Templated pages (one product-page body, a different product each): dedup stays linear in bucket size.

Every templated page shares most LSH bands with every other, so each of those buckets holds about
all of them; star edges (each member to its bucket's smallest id) keep the edges linear where
every pair would be quadratic (2,000 pages: about two million pairs).
"""

import numpy as np
import pytest

from llm_ray.config import DedupConfig
from llm_ray.data import dedup
from llm_ray.data.dedup_stage import components, signature_agreement, size_histogram, star_edges
from tests.test_dedup import TEXTS, change_words, find_clusters, rewrap, signatures

HEADER = ("Home | Shop | New Arrivals | Sale | Brands | Gift Cards | Help Centre | Track Your Order | Sign In | "
          "Basket (0)\nFree standard delivery on orders over £40. Order before 8pm for next-day delivery.\n")
FOOTER = ("\nAbout us | Careers | Press | Sustainability | Affiliate programme | Terms and conditions | Privacy "
          "policy | Cookie settings | Accessibility\nSign up to our newsletter for exclusive offers, early access "
          "to sales and 10% off your first order. We accept Visa, Mastercard, American Express, PayPal and Apple "
          "Pay.\n© 2025 Example Retail Ltd. All rights reserved. Registered in England and Wales, company 0123456.")
PRODUCT = """{name}
Product number: {sku}
Price: £{price}. In stock. Usually dispatched within 24 hours.

Product description
The {name} is designed for everyday use and built to last. Made from carefully selected materials, it
combines a clean modern look with practical details that make a real difference at home, at work or on
the move. Every item is inspected by our quality team before it leaves the warehouse, and we stand
behind it with a two-year manufacturer warranty.

Key features
Durable construction that stands up to daily wear. Lightweight and easy to carry, clean and store.
Designed and tested in our own studio. Available in a range of colours and sizes: see the options above.
Packed in recyclable cardboard with no single-use plastic.

Specifications
Product number: {sku}. Dimensions and weight are listed on the label. Care: wipe clean with a damp
cloth, do not bleach, do not tumble dry. Country of origin: see packaging.

Delivery and returns
Standard delivery takes three to five working days. Express delivery is available at checkout for most
postcodes. If you are not completely happy with your purchase you can return it within 30 days for a
full refund. Items must be unused and in their original packaging. Read our full returns policy for
details, or contact us and we will arrange a collection from your door free of charge.

Customer reviews
Be the first to review the {name}. Questions about this product? Our customer service team is available
seven days a week by phone, email or live chat, and most questions are answered within the hour.
"""
ADJECTIVES = ["Classic", "Modern", "Compact", "Deluxe", "Essential", "Nordic", "Urban", "Heritage"]
MATERIALS = ["Oak", "Walnut", "Steel", "Linen", "Ceramic", "Bamboo", "Leather", "Glass"]
ITEMS = ["Side Table", "Desk Lamp", "Bookshelf", "Armchair", "Storage Box", "Wall Clock", "Coat Rack", "Stool"]
VOCABULARY = sorted({w for t in TEXTS for w in t.split()})


def product_page(i: int, rng: np.random.Generator) -> str:
    """The i-th product's page: the shop's template with its own name, product number and price."""
    name = (f"{ADJECTIVES[i % 8]} {MATERIALS[i // 8 % 8]} {ITEMS[i // 64 % 8]} "
            f"{'ABCDEFGH'[i // 512 % 8]}{i:05d}")
    price = f"{rng.integers(5, 500)}.{rng.integers(0, 100):02d}"
    return HEADER + PRODUCT.format(name=name, sku=f"PN-{700000 + 37 * i}", price=price) + FOOTER


def ordinary_document(rng: np.random.Generator, shop_page: bool) -> str:
    """A distinct document: random words from the plays' vocabulary, some framed by the shop's header
    and footer (the shop's other pages: they share that much text with the product pages, no more)."""
    body = " ".join(rng.choice(VOCABULARY, size=int(rng.integers(150, 400))))
    return HEADER + body + FOOTER if shop_page else body


def templated_corpus(num_templated: int, num_ordinary: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Product pages and ordinary documents in a shuffled corpus order; is_templated per document id."""
    rng = np.random.default_rng(seed)
    texts = [product_page(i, rng) for i in range(num_templated)]
    texts += [ordinary_document(rng, shop_page=k % 4 == 0) for k in range(num_ordinary)]
    order = rng.permutation(len(texts))  # templated and ordinary ids interleaved
    return [texts[k] for k in order], order < num_templated


def star_clusters(sigs: np.ndarray, threshold: float) -> dict:
    """The production clustering, in one process: band keys, star edges (one partition holding every
    band), verification on the full signatures, connected components."""
    bands, rows = dedup.lsh_params(threshold, sigs.shape[1])
    keys = dedup.band_keys(sigs, bands, rows)  # (n, bands)
    ids = np.arange(len(sigs), dtype=np.uint64)
    candidates = star_edges(np.stack([keys.ravel(), np.repeat(ids, bands)], axis=1))
    edges = candidates[signature_agreement(sigs[candidates[:, 0]], sigs[candidates[:, 1]]) >= threshold]
    node_hashes = np.stack([ids, np.zeros_like(ids), ids], axis=1)  # content keys do not matter here
    found = components(edges, node_hashes, group_sizes=np.zeros((0, 2), dtype=np.int64))
    labels = np.arange(len(sigs))
    labels[found["nodes"]] = found["rep"]
    return {"bands": bands, "candidates": candidates, "edges": edges, "labels": labels, "sizes": found["sizes"]}


@pytest.fixture(scope="module")
def templated():
    """2,000 product pages beside 1,600 ordinary documents, with their signatures as prepare computes them."""
    texts, is_templated = templated_corpus(2_000, 1_600)
    return signatures(texts), is_templated


def test_templated_pages_form_one_cluster_with_edges_linear_in_documents(templated):
    sigs, is_templated = templated
    found = star_clusters(sigs, DedupConfig().threshold)
    num_docs = len(sigs)
    # Every pair of the product pages would be about 2,000,000 edges.
    assert len(found["candidates"]) <= 2 * found["bands"] * num_docs
    assert len(found["edges"]) <= 2 * found["bands"] * num_docs
    labels = found["labels"]
    assert len(np.unique(labels[is_templated])) == 1  # the planted cluster, whole
    assert np.array_equal(labels[~is_templated], np.flatnonzero(~is_templated))  # no ordinary document in any
    expected = size_histogram([is_templated.sum()])
    assert expected[-1] == [1025, 1] and size_histogram(found["sizes"]) == expected


def test_star_edges_find_the_clusters_of_all_pairs_on_planted_copies():
    """The planted copies of test_dedup (edited, re-wrapped, a new header, an edited copy of an edited copy,
    another edition that must stay apart): star edges and all pairs give the same clusters."""
    cfg = DedupConfig(exact=False)
    texts = TEXTS[:10] + [change_words(TEXTS[0], 0.03, seed=7), rewrap(TEXTS[1]), "A new preface.\n\n" + TEXTS[2],
                          change_words(change_words(TEXTS[0], 0.03, seed=7), 0.02, seed=8),
                          change_words(TEXTS[3], 0.05, seed=9)]
    sigs = signatures(texts, cfg)
    exact = np.array([dedup.exact_hash(t) for t in texts])
    reference = find_clusters(np.arange(len(texts)), exact, sigs, cfg)["labels"]
    assert star_clusters(sigs, cfg.threshold)["labels"].tolist() == reference.tolist()
    assert len(set(reference.tolist())) == 10  # the copies did merge


def test_size_histogram_bins_by_powers_of_two():
    assert size_histogram([1, 2, 2, 3, 4, 5, 8, 9, 17]) == [[2, 2], [3, 2], [5, 2], [9, 1], [17, 1]]
    assert size_histogram([1, 1]) == []
    assert size_histogram([1000]) == [[2, 0], [3, 0], [5, 0], [9, 0], [17, 0], [33, 0], [65, 0], [129, 0],
                                      [257, 0], [513, 1]]  # bounded by log2 of the largest cluster


@pytest.mark.integration
def test_dedup_rounds_report_candidate_edges_and_cluster_sizes(ray_session, tmp_path):
    """Through the Ray rounds, over three shards: 300 product pages, 240 ordinary documents, one of them
    twice more (an exact-only group of 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm_ray.data.dedup_stage import cluster_shards
    from llm_ray.storage import Location

    d = DedupConfig()
    texts, is_templated = templated_corpus(300, 240, seed=1)
    single = int(np.flatnonzero(~is_templated)[0])
    texts += [texts[single], "  " + texts[single].upper()]  # exact copies after normalization
    sigs, exact = signatures(texts, d), [dedup.exact_hash(t) for t in texts]
    root, shards = Location(str(tmp_path)), []
    for n, (lo, hi) in enumerate([(0, 200), (200, 201), (201, len(texts))]):
        shards.append(root / "documents" / f"part-{n}.parquet")
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table({"doc_key": [f"doc{i:04d}" for i in range(lo, hi)], "exact": exact[lo:hi],
                                 "bytes": [len(t.encode()) for t in texts[lo:hi]],
                                 "signature": [s.tobytes() for s in sigs[lo:hi]]}), buffer)
        shards[-1].write_bytes(buffer.getvalue().to_pybytes())
    found = cluster_shards(shards, d, root / "dedup", seed=0, val_fraction=0.2)

    assert found["docs_out"] == 240 + 1 and found["exact_duplicates"] == 2
    assert found["clusters_with_copies"] == 2 and found["largest_cluster"] == 300
    assert found["cluster_size_histogram"] == [[2, 0], [3, 1], [5, 0], [9, 0], [17, 0], [33, 0], [65, 0],
                                               [129, 0], [257, 1]]
    # 300 pages in one component take at least 299 edges; star edges at most one per band and document.
    assert 299 <= found["near_duplicate_pairs"] <= found["candidate_edges"] <= found["lsh_bands"] * len(texts)
