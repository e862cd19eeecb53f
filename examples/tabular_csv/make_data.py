"""Write each site's table and data file from scikit-learn's breast cancer set (569 tumours,
30 measurements, benign / malignant), with label skew: the sites see the classes in different
proportions, as hospitals with different referral patterns would.

    python examples/tabular_csv/make_data.py OUT_DIR [--sites 3]

writes OUT_DIR/site-a.csv and OUT_DIR/site-a.toml (the file `--site-data` takes), and so on.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

LABELS = ("benign", "malignant")


def site_names(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


def split_by_label_skew(y: np.ndarray, n_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Indices of each site: class 0 dealt in proportions 1:2:...:n, class 1 in n:...:2:1."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        weights = np.arange(1, n_sites + 1, dtype=float)
        weights = weights if cls % 2 == 0 else weights[::-1]
        cuts = np.round(np.cumsum(weights / weights.sum())[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def write_sites(out: Path, n_sites: int = 3, seed: int = 0) -> dict[str, Path]:
    """site name -> its data file (TOML), with the CSV beside it."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    columns = [name.replace(" ", "_") for name in data.feature_names]
    names = data.target_names[data.target]          # "malignant" / "benign"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for site, idx in zip(site_names(n_sites), split_by_label_skew(data.target, n_sites, seed)):
        with (out / f"{site}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["record_id", *columns, "diagnosis"])
            for i in idx:
                writer.writerow([f"r{i:04d}", *(repr(float(v)) for v in data.data[i]), names[i]])
        files[site] = out / f"{site}.toml"
        files[site].write_text(f"""# {site}'s own data: given to its participant only (ktfed participant run --site-data)
[data]
format = "csv"
path = "{site}.csv"
label = "diagnosis"
ignore = ["record_id"]      # an identifier, not a feature; every other column is one
labels = {json.dumps(list(LABELS))}   # the federation's label set, whichever this site holds
task = "tabular-mlp"
""")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()
    for site, path in write_sites(args.out, args.sites).items():
        print(f"{site}: {path}")


if __name__ == "__main__":
    main()
