"""The ledger's Merkle tree heads: RFC 6962 section 2.1 (the Certificate Transparency test vectors), the
incremental frontier against a direct recursive reading of the RFC, and value commitments."""

from __future__ import annotations

import hashlib
import os

import pytest

from schoolslink.ledger import EMPTY_ROOT, Frontier, commitment, leaf_hash, merkle_root, node_hash, opens

# Leaves and tree heads used by certificate-transparency's own tests (merkle_tree_test / RFC 6962 reference).
LEAVES = [b"", b"\x00", b"\x10", b"\x20\x21", b"\x30\x31", b"\x40\x41\x42\x43", bytes(range(0x50, 0x58)),
          bytes(range(0x60, 0x70))]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _mth(d: list[bytes]) -> bytes:
    """MTH exactly as RFC 6962 2.1 writes it: k is the largest power of two smaller than n."""
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaf_hash(d[0])
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(_mth(d[:k]), _mth(d[k:]))


def test_empty_tree_is_the_hash_of_nothing() -> None:
    assert merkle_root([]).hex() == EMPTY_ROOT == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("n", range(1, 9))
def test_rfc6962_vectors(n: int) -> None:
    assert merkle_root(LEAVES[:n]).hex() == ROOTS[n - 1]


def test_frontier_matches_the_recursive_definition_at_every_size_and_survives_a_round_trip() -> None:
    data = [os.urandom(32) for _ in range(70)]
    f = Frontier()
    for i, d in enumerate(data, 1):
        f.add(leaf_hash(d))
        assert f.root() == _mth(data[:i]), i
        again = Frontier.from_json(f.size, f.to_json())
        assert again.root() == f.root()
    # carrying on from a stored frontier gives what a full recomputation gives
    g = Frontier.from_json(40, _frontier_of(data[:40]).to_json())
    for d in data[40:]:
        g.add(leaf_hash(d))
    assert g.root() == _mth(data)


def test_a_frontier_for_another_size_is_refused() -> None:
    f = _frontier_of([b"a", b"b", b"c"])
    with pytest.raises(ValueError):
        Frontier.from_json(4, f.to_json())


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    # a two-leaf tree's root is not the leaf hash of the concatenated leaf hashes (second-preimage defence)
    assert merkle_root([b"a", b"b"]) == node_hash(a, b) != leaf_hash(a + b)


def test_commitments_open_only_with_their_salt_and_value() -> None:
    salt = bytes(range(16))
    c = commitment(salt, "93.1")
    assert c == hashlib.sha256(salt + b"93.1").hexdigest()
    doc = '{"attendance_percent":"' + c + '"}'
    assert opens(doc, "attendance_percent", salt.hex(), "93.1")
    assert not opens(doc, "attendance_percent", salt.hex(), "93.2")
    assert not opens(doc, "attendance_percent", bytes(16).hex(), "93.1")
    assert not opens(doc, "sen_provision", salt.hex(), "93.1")
    assert not opens("", "attendance_percent", salt.hex(), "93.1")


def _frontier_of(data: list[bytes]) -> Frontier:
    f = Frontier()
    for d in data:
        f.add(leaf_hash(d))
    return f
