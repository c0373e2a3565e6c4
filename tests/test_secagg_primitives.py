"""Secure-aggregation primitives: masks, Shamir, AEAD, HKDF labels, X25519, graph."""

from __future__ import annotations

import os

import numpy as np
import pytest
import sympy
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from consortia.privacy.secagg import aead, fast_stream, labels, masks, shamir
from consortia.privacy.secagg.errors import SecAggProtocolError
from consortia.privacy.secagg.graph import (
    default_num_neighbours,
    default_threshold,
    is_connected,
    neighbour_graph,
)
from consortia.privacy.secagg.kdf import hkdf_sha256
from consortia.privacy.secagg.key_agreement import X25519KeyPair
from consortia.privacy.secagg.masks import add_mask, add_masks, expand_mask


def _fold32(key: bytes) -> int:
    words = np.frombuffer(key, dtype="<u4")
    return int(np.bitwise_xor.reduce(words))


def test_keys_that_agree_on_their_32_bit_fold_give_different_masks():
    key_a = bytearray(os.urandom(32))
    key_b = bytearray(key_a)
    # Flipping the same bit in two words leaves the XOR-fold unchanged.
    key_b[0] ^= 0x01
    key_b[4] ^= 0x01
    assert key_a != key_b and _fold32(bytes(key_a)) == _fold32(bytes(key_b))

    mask_a = expand_mask(bytes(key_a), 4096)
    mask_b = expand_mask(bytes(key_b), 4096)
    assert np.mean(mask_a != mask_b) > 0.99


@pytest.fixture
def restore_stream_code():
    kept = masks._chosen_code
    yield
    masks._chosen_code = kept


_VAES = pytest.param("vaes", marks=pytest.mark.skipif(
    not fast_stream.available(), reason=f"our VAES code: {fast_stream.unavailable_reason()}"))


@pytest.mark.parametrize("code", ["gcm", "ctr", _VAES])
def test_mask_is_the_aes256_ctr_keystream_across_chunk_boundaries(code, restore_stream_code):
    key = os.urandom(32)
    length = 100_003  # > one 256 KiB chunk, and not a multiple of the AES block
    # Whichever of OpenSSL's codes draws it: counter mode from the counter block 0^96 || 2.
    masks.stream_code(code)
    first_block = bytes(12) + (2).to_bytes(4, "big")
    stream = Cipher(algorithms.AES(key), modes.CTR(first_block)).encryptor().update(bytes(4 * length))
    assert np.array_equal(expand_mask(key, length), np.frombuffer(stream, dtype="<u4"))


def test_the_stream_code_is_chosen_once_and_a_wrong_one_refused(restore_stream_code):
    masks._chosen_code = None
    chosen = masks.stream_code()
    codes = ["ctr", "gcm"] + (["vaes"] if fast_stream.available() else [])
    assert chosen in codes and masks.stream_code() == chosen
    key = os.urandom(32)
    assert masks.keystream(key, code="gcm").update(bytes(1 << 20)) == masks.keystream(
        key, code="ctr").update(bytes(1 << 20))
    with pytest.raises(ValueError, match=rf"'ecb' is not one of {codes}".replace("[", r"\[")):
        masks.stream_code("ecb")
    assert masks.stream_code() == chosen
    # keystream() is always one of OpenSSL's encryptors, whatever draws the bulk streams.
    with pytest.raises(ValueError, match="'vaes' is not one of"):
        masks.keystream(key, code="vaes")


def test_our_vaes_code_is_built_and_used_where_the_cpu_has_vaes_and_a_compiler_is_found():
    """A silent build failure (the extension is optional) would leave every client on
    OpenSSL's slower code: on an x86-64 Linux machine with VAES and a C compiler, the
    install must have built it and this process must use it."""
    import platform
    import shutil

    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if platform.machine() != "x86_64" or not {"avx2", "aes", "vaes"} <= flags:
        pytest.skip("not an x86-64 Linux CPU with AVX2, AES-NI and VAES")
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the install leaves our VAES code out (OpenSSL draws)")
    assert fast_stream.available(), fast_stream.unavailable_reason()


@pytest.mark.skipif(not fast_stream.available(), reason="our VAES code is not available here")
@settings(max_examples=200, deadline=None)
@given(words=st.integers(0, 3000), first_block=st.integers(0, 2000),
       signs=st.lists(st.sampled_from([1, -1, 0]), min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_our_vaes_code_equals_openssls_stream_for_any_length_offset_and_signs(words, first_block,
                                                                             signs, seed):
    rng = np.random.default_rng(seed)
    keyed_signs = [(rng.bytes(32), sign) for sign in signs]
    start = rng.integers(0, 2**32, size=words, dtype=np.uint32)
    expected = start.copy()
    for key, sign in keyed_signs:
        stream = fast_stream.openssl_stream(key, words, first_block)
        expected = expected + stream if sign == 1 else (
            expected - stream if sign == -1 else stream.copy())
    got = start.copy()
    fast_stream.apply(got, keyed_signs, first_block=first_block)
    assert np.array_equal(got, expected)


@pytest.mark.skipif(not fast_stream.available(), reason="our VAES code is not available here")
def test_our_vaes_code_refuses_what_it_cannot_draw():
    key = os.urandom(32)
    with pytest.raises(ValueError, match="uint32"):
        fast_stream.apply(np.zeros(8, dtype=np.int32), [(key, 1)])
    with pytest.raises(ValueError, match="32 bytes"):
        fast_stream.apply(np.zeros(8, dtype=np.uint32), [(key[:31], 1)])
    with pytest.raises(ValueError, match="sign"):
        fast_stream.apply(np.zeros(8, dtype=np.uint32), [(key, 2)])
    # The 32-bit block counter's last value is block 2**32 - 3 of the stream.
    fast_stream.apply(np.zeros(4, dtype=np.uint32), [(key, 1)], first_block=2**32 - 3)
    with pytest.raises(ValueError, match="2\\*\\*32 - 2 blocks"):
        fast_stream.apply(np.zeros(8, dtype=np.uint32), [(key, 1)], first_block=2**32 - 3)
    with pytest.raises(ValueError, match="256 keys"):
        fast_stream.apply(np.zeros(8, dtype=np.uint32), [(key, 1)] * 257)


@pytest.mark.parametrize("code", ["gcm", "ctr", _VAES])
def test_a_word_stream_drawn_in_pieces_is_the_keys_stream(code, restore_stream_code):
    masks.stream_code(code)
    key = os.urandom(32)
    buffer = np.empty(1004, dtype=np.int32)
    stream = masks.WordStream(key)
    drawn = []
    for count in (1000, 64, 8, 333):  # whole blocks, then a partial last draw
        stream.draw_into(buffer, count)
        drawn.append(buffer[:count].view(np.uint32).copy())
    assert np.array_equal(np.concatenate(drawn), fast_stream.openssl_stream(key, 1405))
    with pytest.raises(ValueError, match="last draw was not a whole number of blocks"):
        stream.draw_into(buffer, 4)
    with pytest.raises(ValueError, match="a draw of 1001 words needs a buffer of 1005, got 1004"):
        masks.WordStream(key).draw_into(buffer, 1001)


def test_adding_then_subtracting_a_mask_restores_the_vector_modulo_2_32():
    vector = np.random.default_rng(1).integers(0, 2**32, size=100_003, dtype=np.uint32)
    acc = vector.copy()
    key = os.urandom(32)
    add_mask(acc, key, sign=1)
    assert not np.array_equal(acc, vector)
    add_mask(acc, key, sign=-1)
    assert np.array_equal(acc, vector)


def test_several_masks_in_one_pass_equal_adding_them_one_by_one():
    vector = np.random.default_rng(2).integers(0, 2**32, size=200_003, dtype=np.uint32)
    keyed_signs = [(os.urandom(32), sign) for sign in (1, -1, 1, 1, -1, -1, 1)]
    one_by_one, together = vector.copy(), vector.copy()
    for key, sign in keyed_signs:
        add_mask(one_by_one, key, sign=sign)
    add_masks(together, keyed_signs)
    assert np.array_equal(together, one_by_one)
    add_masks(together, [(key, -sign) for key, sign in keyed_signs])
    assert np.array_equal(together, vector)


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_masks_split_among_threads_equal_one_thread(workers):
    vector = np.random.default_rng(3).integers(0, 2**32, size=300_001, dtype=np.uint32)
    keyed_signs = [(os.urandom(32), 1 if i % 3 else -1) for i in range(13)]
    one, split = vector.copy(), vector.copy()
    add_masks(one, keyed_signs)
    add_masks(split, keyed_signs, workers=workers)
    assert np.array_equal(split, one)


def test_mask_rejects_short_keys_and_wrong_dtypes():
    with pytest.raises(ValueError, match="32"):
        expand_mask(os.urandom(16), 10)
    with pytest.raises(ValueError, match="uint32"):
        add_mask(np.zeros(4, dtype=np.int64), os.urandom(32), sign=1)
    with pytest.raises(ValueError, match="32"):
        add_masks(np.zeros(4, dtype=np.uint32), [(os.urandom(32), 1), (os.urandom(31), 1)])
    with pytest.raises(ValueError, match="sign"):
        add_masks(np.zeros(4, dtype=np.uint32), [(os.urandom(32), 2)])


def test_shamir_prime_is_the_smallest_prime_above_2_256():
    assert shamir.PRIME > 2**256
    assert sympy.isprime(shamir.PRIME)
    assert sympy.nextprime(2**256) == shamir.PRIME
    assert shamir.PRIME < 2 ** (8 * shamir.SHARE_LEN)  # every field element fits a share


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.integers(min_value=2, max_value=9),
    data=st.data(),
)
def test_any_threshold_shares_recover_the_secret(secret, holders, data):
    threshold = data.draw(st.integers(min_value=1, max_value=holders))
    xs = data.draw(
        st.lists(st.integers(1, 10_000), min_size=holders, max_size=holders, unique=True)
    )
    shares = shamir.split(secret, threshold=threshold, xs=xs)
    assert all(len(s) == shamir.SHARE_LEN for s in shares.values())
    subset = data.draw(st.permutations(xs))[:threshold]
    assert shamir.combine({x: shares[x] for x in subset}, threshold=threshold) == secret


def test_fewer_than_threshold_shares_do_not_recover_the_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="3 needed"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    # Interpolating 2 shares as if t were 2 gives some other value (or out of range).
    try:
        guess = shamir.combine({1: shares[1], 2: shares[2]}, threshold=2)
    except SecAggProtocolError:
        guess = None
    assert guess != secret


def test_sealed_shares_fail_authentication_when_altered_or_misdirected():
    key = os.urandom(32)
    ad = b"run 1 round 2 from 3 to 4"
    sealed = aead.seal(key, b"share bytes", ad)
    assert aead.open_sealed(key, sealed, ad) == b"share bytes"
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(SecAggProtocolError, match="authentication"):
        aead.open_sealed(key, bytes(tampered), ad)
    with pytest.raises(SecAggProtocolError, match="authentication"):
        aead.open_sealed(key, sealed, b"run 1 round 3 from 3 to 4")
    with pytest.raises(SecAggProtocolError, match="bytes"):
        aead.open_sealed(key, sealed[:10], ad)


def test_domain_separation_labels_are_distinct_and_bind_their_context():
    all_labels = [
        labels.LABEL_PAIRWISE_MASK,
        labels.LABEL_SELF_MASK,
        labels.LABEL_SHARE_ENCRYPTION,
        labels.LABEL_NEIGHBOUR_GRAPH,
        labels.LABEL_SHARE_AD,
    ]
    assert len(set(all_labels)) == len(all_labels)
    assert all(b"\x00" not in label for label in all_labels)
    assert all(label.startswith(b"consortia/secagg/v1/") for label in all_labels)

    ikm = os.urandom(32)
    seed = os.urandom(32)
    base = {"run_id": 1, "round_num": 2, "round_seed": seed, "nodes": (3, 4)}
    variants = [
        base,
        {**base, "run_id": 9},
        {**base, "round_num": 3},
        {**base, "round_seed": os.urandom(32)},
        {**base, "nodes": (4, 3)},
    ]
    keys = {
        hkdf_sha256(ikm, label=labels.LABEL_PAIRWISE_MASK, context=labels.context(**v))
        for v in variants
    }
    keys.add(hkdf_sha256(ikm, label=labels.LABEL_SELF_MASK, context=labels.context(**base)))
    assert len(keys) == len(variants) + 1


def test_x25519_agreement_is_symmetric_and_its_repr_hides_the_private_key():
    a, b = X25519KeyPair.generate(), X25519KeyPair.generate()
    assert a.agree(b.public_bytes) == b.agree(a.public_bytes)
    assert a.private_bytes().hex() not in repr(a)
    assert "hidden" in repr(a)
    with pytest.raises(SecAggProtocolError, match="32"):
        a.agree(b"short", peer_id=5)
    with pytest.raises(SecAggProtocolError, match="invalid"):
        a.agree(bytes(32), peer_id=5)  # the all-zero point has low order
    with pytest.raises(SecAggProtocolError, match="invalid"):
        a.agree(bytes(32), peer_id=5)  # a refused key is not remembered as agreed


def test_remembered_agreements_are_the_key_pairs_own():
    a, b, c = (X25519KeyPair.generate() for _ in range(3))
    ab = a.agree(b.public_bytes)
    assert a.agreements() == {b.public_bytes: ab}
    # Another object for a's private key (as a client reloads its state) gets the same
    # secret, remembered or not; another key pair agreeing with the same peer does not.
    assert X25519KeyPair.from_private_bytes(a.private_bytes()).agree(b.public_bytes) == ab
    reloaded = X25519KeyPair.from_private_bytes(a.private_bytes(), public_bytes=a.public_bytes,
                                                agreed=a.agreements())
    assert reloaded.agree(b.public_bytes) == ab and reloaded.public_bytes == a.public_bytes
    assert c.agree(b.public_bytes) != ab and c.agreements() == {b.public_bytes: c.agree(
        b.public_bytes)}
    assert c.agree(b.public_bytes) == b.agree(c.public_bytes)


def test_a_key_pair_remembers_its_latest_agreements_up_to_its_bound():
    from consortia.privacy.secagg import key_agreement

    a = X25519KeyPair.generate()
    peers = [X25519KeyPair.generate() for _ in range(key_agreement.AGREEMENTS_KEPT + 5)]
    for p in peers:
        a.agree(p.public_bytes)
    a.agree(peers[5].public_bytes)  # used again: the newest
    kept = list(a.agreements())
    assert len(kept) == key_agreement.AGREEMENTS_KEPT and kept[-1] == peers[5].public_bytes
    assert peers[4].public_bytes not in kept and peers[6].public_bytes in kept  # 0 to 4 went
    # What it remembers is what X25519 gives.
    assert all(a.agreements()[p.public_bytes] == p.agree(a.public_bytes) for p in peers[7:])


@pytest.mark.parametrize("n", [2, 3, 7, 10, 30, 101])
def test_neighbour_graph_is_shared_symmetric_regular_and_connected(n):
    nodes = list(range(1000, 1000 + n))
    k = default_num_neighbours(n)
    seed = os.urandom(32)
    graph = neighbour_graph(nodes, num_neighbours=k, seed=seed)
    assert graph == neighbour_graph(list(reversed(nodes)), num_neighbours=k, seed=seed)
    for v, neighbours in graph.items():
        assert v not in neighbours
        assert all(v in graph[u] for u in neighbours)
        assert len(neighbours) in (k, k - 1)
    assert is_connected(nodes, graph)
    assert 2 <= default_threshold(k) <= k + 1
    if n >= 30:
        assert k <= 2 * np.log2(n)  # grows with log n, not n
        other = neighbour_graph(nodes, num_neighbours=k, seed=os.urandom(32))
        assert other != graph


def test_scratch_buffers_are_kept_per_thread_and_name_and_grow_when_asked_for_more():
    import threading

    from consortia.privacy.secagg import scratch as scratch_module
    from consortia.privacy.secagg.scratch import scratch

    a = scratch("t.a", 100, np.float64)
    assert a.shape == (100,) and a.dtype == np.float64
    assert np.shares_memory(scratch("t.a", 50, np.float64), a)  # the same buffer, reused
    assert not np.shares_memory(scratch("t.b", 100, np.float64), a)  # another name
    bigger = scratch("t.a", 200, np.float64)
    assert bigger.shape == (200,) and np.shares_memory(scratch("t.a", 200, np.float64), bigger)
    assert scratch("t.a", 10, np.int32).dtype == np.int32  # another dtype: a new one
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch("t.b", 100, np.float64)))
    thread.start()
    thread.join()
    assert not np.shares_memory(other[0], scratch("t.b", 100, np.float64))
    scratch_module.MAX_KEPT_VALUES, kept = 8, scratch_module.MAX_KEPT_VALUES
    try:  # above the bound: a fresh buffer each time, nothing kept
        assert not np.shares_memory(scratch("t.c", 9, np.uint8), scratch("t.c", 9, np.uint8))
    finally:
        scratch_module.MAX_KEPT_VALUES = kept


def test_the_environment_names_the_stream_code_and_a_wrong_name_is_refused_at_start(
        monkeypatch, restore_stream_code):
    from consortia.config import load_config
    from consortia.simulations import runner

    monkeypatch.setenv(masks.STREAM_CODE_ENV, "ctr")
    masks._chosen_code = None
    assert masks.stream_code() == "ctr"  # named, not timed
    monkeypatch.setenv(masks.STREAM_CODE_ENV, "aes-ni")
    masks._chosen_code = None
    accepted = ["ctr", "gcm"] + (["vaes"] if fast_stream.available() else [])
    said = (f"CONSORTIA_SECAGG_STREAM_CODE: stream code 'aes-ni' is not one of {accepted}; "
            "unset it to choose the fastest")
    with pytest.raises(ValueError) as err:
        masks.stream_code()
    assert str(err.value) == said
    # At start: a simulation with secure aggregation, and a partner's client join.
    monkeypatch.setattr(runner, "check_model_fits", lambda cfg: None)
    with pytest.raises(ValueError) as err:
        runner.start_checks(load_config(None, ["task=digits-mlp", "secagg.enabled=true"]))
    assert str(err.value) == said
    runner.start_checks(load_config(None, ["task=digits-mlp", "secagg.enabled=false"]))
    # client join: tests/test_client_runtime.py


def test_without_our_library_the_streams_are_openssls_and_asking_for_ours_says_why(
        monkeypatch, restore_stream_code):
    """A machine without a C compiler at install (or off x86-64, or a CPU without VAES)."""
    monkeypatch.setattr(fast_stream, "_lib", None)
    monkeypatch.setattr(fast_stream, "_reason", "not built (no C compiler at install, or not "
                                                "x86-64): reinstall with one to build it")
    monkeypatch.delenv(masks.STREAM_CODE_ENV, raising=False)
    masks._chosen_code = None
    assert masks.stream_code() in ("ctr", "gcm")
    with pytest.raises(ValueError, match=r"'vaes' is not one of \['ctr', 'gcm'\] \(vaes here: "
                                         r"not built \(no C compiler"):
        masks.stream_code("vaes")
    with pytest.raises(RuntimeError, match="not available: not built"):
        fast_stream.apply(np.zeros(4, dtype=np.uint32), [(os.urandom(32), 1)])
    key = os.urandom(32)
    assert np.array_equal(expand_mask(key, 1001), fast_stream.openssl_stream(key, 1001))


def test_a_library_that_is_not_there_or_does_not_load_is_said_not_used(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setattr(fast_stream, "_lib", None)
    monkeypatch.setattr(fast_stream, "_reason", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not fast_stream.available()
    assert fast_stream.unavailable_reason().startswith("not built")
    broken = tmp_path / "_aesctr.so"
    broken.write_bytes(b"not a library")
    spec = type("Spec", (), {"origin": str(broken)})()
    monkeypatch.setattr(fast_stream, "_reason", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert not fast_stream.available()
    assert fast_stream.unavailable_reason().startswith(f"{broken} does not load")


@pytest.mark.skipif(not fast_stream.available(), reason="our VAES code is not available here")
def test_a_library_whose_stream_differs_from_openssls_is_not_used(monkeypatch):
    monkeypatch.setattr(fast_stream, "_lib", None)
    monkeypatch.setattr(fast_stream, "_reason", None)
    monkeypatch.setattr(fast_stream, "_self_test", lambda: False)
    assert not fast_stream.available()
    assert fast_stream.unavailable_reason() == ("its stream differed from OpenSSL's on this "
                                                "machine (not used)")
