"""An Identity keeps its hash once computed (issue 18: it is a dict key several times a request).
The hash must still follow equality: what eq compares, and nothing it leaves out."""

from __future__ import annotations

import copy
import dataclasses
import pickle

from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.model import Identity

_TEXT = st.sampled_from(["", "a", "b"])
_SETS = st.frozensets(st.sampled_from(["r1", "r2"]))
IDENTITIES = st.builds(Identity, kind=st.sampled_from(["user", "service", "device"]), sub=_TEXT, username=_TEXT,
                       method=st.sampled_from(["bearer", "k1"]), roles=_SETS, client_roles=_SETS, scopes=_SETS,
                       groups=_SETS, azp=_TEXT, expires_at=st.sampled_from([None, 1.0, 2.0]), device_id=_TEXT,
                       owner_sub=_TEXT, owner_username=_TEXT, credential=_TEXT,
                       claims=st.sampled_from([(), (("jti", "x"),)]))


@given(IDENTITIES, IDENTITIES)
def test_equal_identities_hash_alike_and_a_kept_hash_is_the_first_one(a, b):
    first = hash(a)
    assert hash(a) == first   # kept
    if a == b:
        assert hash(b) == first
    fresh = dataclasses.replace(a)
    assert fresh == a and hash(fresh) == first
    # What eq leaves out (how a device authenticated, the raw claims) the hash leaves out too.
    other = dataclasses.replace(a, credential=a.credential + "-other", claims=(("other", 1),))
    assert other == a and hash(other) == first


def test_a_changed_copy_hashes_itself_anew():
    a = Identity(kind="user", sub="s", username="u", method="bearer")
    hash(a)
    b = dataclasses.replace(a, username="v")
    assert b != a and hash(b) == hash(Identity(kind="user", sub="s", username="v", method="bearer"))


def test_a_copy_through_pickle_keeps_the_fields_and_not_the_hash():
    # (a str's hash differs between processes: a copy made in another one must not bring its own)
    a = Identity(kind="user", sub="s", username="u", method="bearer", roles=frozenset({"r"}),
                 credential="k1:00", claims=(("jti", "x"),))
    hash(a)
    for b in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), copy.copy(a)):  # noqa: S301 (its own bytes)
        assert b == a and b.credential == a.credential and b.claims == a.claims
        assert b._hash in (0, hash(a)) and hash(b) == hash(a)
    assert pickle.loads(pickle.dumps(a))._hash == 0  # noqa: S301 (its own bytes)
