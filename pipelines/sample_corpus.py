"""Build the demo corpus: deterministic short documents over a few topics, plus some bad rows.

The demo must run with no network, so the corpus is generated rather than downloaded. A handful of rows
are deliberately invalid (null, blank, duplicate ids) so the demo also shows how rejections are reported.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS: dict[str, dict[str, list[str]]] = {
    "finance": {
        "subject": ["The central bank", "A regional lender", "Bond traders", "The treasury", "Hedge funds",
                    "Retail investors", "The stock exchange", "Pension managers"],
        "verb": ["raised", "cut", "warned about", "bet against", "reported", "cautioned on", "priced in"],
        "object": ["interest rates", "quarterly earnings", "inflation expectations", "the yield curve",
                   "credit spreads", "currency volatility", "dividend payouts", "mortgage defaults"],
    },
    "sports": {
        "subject": ["The home team", "The veteran striker", "The coach", "The league", "A rookie pitcher",
                    "The champions", "The goalkeeper", "Fans in the stadium"],
        "verb": ["celebrated", "lost", "won", "struggled with", "defended", "criticised", "dominated"],
        "object": ["the final match", "a late penalty", "the season opener", "the championship title",
                   "an overtime thriller", "the transfer window", "a record-breaking sprint", "the playoffs"],
    },
    "science": {
        "subject": ["Researchers", "A team of physicists", "The space agency", "Marine biologists",
                    "Climate scientists", "A new telescope", "Geneticists", "Chemists"],
        "verb": ["discovered", "measured", "modelled", "observed", "sequenced", "simulated", "confirmed"],
        "object": ["a distant exoplanet", "coral reef bleaching", "gravitational waves", "a protein structure",
                   "ocean temperature records", "a new superconductor", "ancient DNA", "solar flares"],
    },
    "technology": {
        "subject": ["The startup", "A chip maker", "Cloud providers", "The open-source community",
                    "Security researchers", "The smartphone maker", "Engineers", "A database vendor"],
        "verb": ["released", "patched", "benchmarked", "open-sourced", "shipped", "deprecated", "acquired"],
        "object": ["a faster GPU", "a critical vulnerability", "its new compiler", "a vector database",
                   "an edge computing platform", "a large language model", "battery firmware", "a sync protocol"],
    },
    "health": {
        "subject": ["Doctors", "The hospital", "A clinical trial", "Public health officials", "Nurses",
                    "The health ministry", "Pharmacists", "A new study"],
        "verb": ["recommended", "tested", "reported", "tracked", "approved", "warned about", "expanded"],
        "object": ["a flu vaccine", "sleep quality", "blood pressure treatment", "a measles outbreak",
                   "telehealth visits", "antibiotic resistance", "a cancer screening", "childhood nutrition"],
    },
    "food": {
        "subject": ["The chef", "A family bakery", "Food critics", "The farmers market", "Home cooks",
                    "A street vendor", "The restaurant", "Wine makers"],
        "verb": ["served", "reinvented", "praised", "sourced", "fermented", "roasted", "paired"],
        "object": ["sourdough bread", "a spicy noodle soup", "seasonal vegetables", "dark chocolate",
                   "a slow-cooked stew", "fresh oysters", "a citrus tart", "an aged cheese"],
    },
}
CONNECTIVES = ["Meanwhile,", "Later that week,", "According to reports,", "In a statement,", "Separately,",
               "By the afternoon,", "Observers noted that", "As expected,"]
NOISE = ["| col_a | col_b |\n|---|---|\n| 3.14 | 2.71 |", "zxq vbnm qwrt plkj ytre", "404 Not Found <html></html>",
         "ÄÖÜ ßæøå ñç ξψω 漢字 かな", "lorem ipsum dolor sit amet " * 3]


def _sentence(rng: random.Random, topic: dict[str, list[str]]) -> str:
    return f"{rng.choice(topic['subject'])} {rng.choice(topic['verb'])} {rng.choice(topic['object'])}."


def make_documents(n_docs: int, seed: int = 7) -> pa.Table:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    ids, texts, topics = [], [], []
    for i in range(n_docs):
        name = names[i % len(names)] if rng.random() > 0.3 else rng.choice(names)
        topic = TOPICS[name]
        parts = [_sentence(rng, topic)]
        for _ in range(rng.randint(1, 4)):
            parts.append(f"{rng.choice(CONNECTIVES)} {_sentence(rng, topic).lower()}")
        if rng.random() < 0.03:
            parts.append(rng.choice(NOISE))
        ids.append(f"doc-{i:06d}")
        texts.append(" ".join(parts))
        topics.append(name)
    # Deliberately invalid rows: the demo shows they are rejected with a reason, not dropped silently.
    bad = [(f"doc-{n_docs:06d}", None, "bad"), (f"doc-{n_docs + 1:06d}", "   ", "bad"),
           ("doc-000000", "A duplicate id of the first document.", "bad"), (f"doc-{n_docs + 2:06d}", "", "bad")]
    for doc_id, text, topic in bad[: max(0, min(len(bad), n_docs // 100))]:
        ids.append(doc_id)
        texts.append(text)
        topics.append(topic)
    return pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "topic": pa.array(topics, pa.string())})


def write_sample_corpus(path: str | Path, n_docs: int = 2500, seed: int = 7) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(make_documents(n_docs, seed), tmp, row_group_size=1000)
    tmp.replace(path)
    return path
