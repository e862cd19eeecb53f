"""A site's cache of hosted backbones (participant/backbone_cache.py): a download is taken only
when its bytes match the digest and size the coordinator announced, nothing half-written is left
behind, and a size that does not fit the site's disk is refused before a byte is written."""
from __future__ import annotations

import hashlib

import pytest

from participant.backbone_cache import BackboneCacheError, cached_path, fetch

PAYLOAD = bytes(range(256)) * 40
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _pieces(data: bytes, size: int = 1000, start: int = 0):
    calls = []

    def download(offset: int):
        calls.append(offset)
        for i in range(start, len(data), size):
            yield i, data[i:i + size]
    return download, calls


def test_a_download_matching_its_digest_is_kept_and_then_served_from_the_cache(tmp_path):
    download, calls = _pieces(PAYLOAD)
    path = fetch(tmp_path, SHA, len(PAYLOAD), download)
    assert path == cached_path(tmp_path, SHA) and path.read_bytes() == PAYLOAD and calls == [0]
    again, calls_again = _pieces(PAYLOAD)
    assert fetch(tmp_path, SHA, len(PAYLOAD), again) == path and calls_again == []
    path.write_bytes(b"x" + PAYLOAD[1:])            # a damaged cached file is fetched again
    third, calls_third = _pieces(PAYLOAD)
    assert fetch(tmp_path, SHA, len(PAYLOAD), third).read_bytes() == PAYLOAD and calls_third == [0]


@pytest.mark.parametrize("sent, size, message", [
    (PAYLOAD[:-1] + b"!", len(PAYLOAD), "does not match the announced"),
    (PAYLOAD + b"more", len(PAYLOAD), "exceeds its announced"),
    (PAYLOAD[:-10], len(PAYLOAD), "does not match the announced"),
])
def test_a_download_that_is_not_the_announced_backbone_leaves_nothing_behind(tmp_path, sent, size, message):
    download, _ = _pieces(sent)
    with pytest.raises(BackboneCacheError, match=message):
        fetch(tmp_path, SHA, size, download)
    assert list(tmp_path.iterdir()) == []


def test_pieces_out_of_order_are_refused(tmp_path):
    download, _ = _pieces(PAYLOAD, start=1000)
    with pytest.raises(BackboneCacheError, match="at offset 1000, expected 0"):
        fetch(tmp_path, SHA, len(PAYLOAD), download)
    assert list(tmp_path.iterdir()) == []


def test_a_size_that_does_not_fit_the_disk_is_refused_before_any_byte(tmp_path):
    download, calls = _pieces(PAYLOAD)
    with pytest.raises(BackboneCacheError, match=r"announced 1152921504606846976 bytes do not fit .* bytes free"):
        fetch(tmp_path, SHA, 1 << 60, download)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_a_digest_that_is_not_sha256_hex_is_refused():
    with pytest.raises(BackboneCacheError, match="not a SHA-256 hex digest"):
        cached_path("x", "../../etc/passwd")
