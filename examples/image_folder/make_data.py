"""Write each site's image folder and data file from scikit-learn's digits (1797 8x8 grey
images of handwritten digits): one PNG per image under OUT_DIR/site-a/images/<digit>/, with
label skew (each site holds mostly some digits, a few of the others).

    python examples/image_folder/make_data.py OUT_DIR [--sites 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LABELS = tuple(str(d) for d in range(10))


def site_names(n: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


def split_by_label_skew(y: np.ndarray, n_sites: int, seed: int = 0, major: float = 0.8) -> list[np.ndarray]:
    """Digit d goes mostly (`major`) to site d % n_sites, the rest evenly to the others."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_sites)]
    for digit in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == digit))
        home, n_home = int(digit) % n_sites, int(round(len(idx) * major))
        parts[home].extend(idx[:n_home].tolist())
        others = [s for s in range(n_sites) if s != home]
        for site, chunk in zip(others, np.array_split(idx[n_home:], max(len(others), 1))):
            parts[site].extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def write_sites(out: Path, n_sites: int = 2, seed: int = 0, limit: int = 0) -> dict[str, Path]:
    """site name -> its data file (TOML); `limit` keeps that many images per site (0: all)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    # digits' pixels are 0..16: scaled to 8-bit grey
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    files = {}
    for site, idx in zip(site_names(n_sites), split_by_label_skew(digits.target, n_sites, seed)):
        if limit:
            idx = np.sort(np.random.default_rng(seed).permutation(idx)[:limit])
        for digit in LABELS:
            (out / site / "images" / digit).mkdir(parents=True, exist_ok=True)
        for i in idx:
            Image.fromarray(pixels[i], "L").save(out / site / "images" / str(digits.target[i]) / f"{i:04d}.png")
        files[site] = out / site / "data.toml"
        files[site].write_text(f"""# {site}'s own images: given to its participant only (ktfed participant run --site-data)
[data]
format = "image_folder"
path = "images"             # one sub-folder per class, named by its label
image_size = [8, 8]         # [height, width]: images of another size are refused, not resized
channels = 1                # grey (mode L)
labels = {json.dumps(list(LABELS))}
task = "folder-cnn"
""")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=2)
    args = parser.parse_args()
    for site, path in write_sites(args.out, args.sites).items():
        print(f"{site}: {path}")


if __name__ == "__main__":
    main()
