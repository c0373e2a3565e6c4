"""Shamir secret sharing of 256-bit secrets over the prime field GF(2**256 + 297).

2**256 + 297 is the smallest prime above 2**256 (checked with sympy.isprime and
sympy.nextprime), so every 32-byte secret is a field element and a share is one field
element written as 33 big-endian bytes. Any ``threshold`` shares determine the secret;
fewer reveal nothing about it (the polynomial's other coefficients are uniform).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from .errors import SecAggProtocolError

PRIME = 2**256 + 297
SECRET_LEN = 32
SHARE_LEN = 33  # bytes of one field element: PRIME needs 257 bits


def split(secret: bytes, *, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the nonzero points ``xs``; any ``threshold`` recover it."""
    if len(secret) != SECRET_LEN:
        raise ValueError(f"secret has {len(secret)} bytes, expected {SECRET_LEN}")
    points = list(xs)
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ValueError(f"share points must be distinct and in [1, PRIME): {points}")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be in [1, {len(points)}] (the shares)")
    # The other coefficients: uniform 256-bit integers, drawn in one call. They miss only
    # the field's top 297 elements, so they are within statistical distance
    # 297 / PRIME < 2**-247 of uniform over the field (secrets.randbelow(PRIME) would be
    # exact, at about two 33-byte draws per coefficient).
    draws = os.urandom(SECRET_LEN * (threshold - 1))
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [int.from_bytes(draws[i:i + SECRET_LEN], "big")
                     for i in range(0, len(draws), SECRET_LEN)]
    shares = {}
    for x in points:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_LEN, "big")
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Uses the first ``threshold`` shares; with honest share holders any subset agrees.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares given, {threshold} needed")
    points = []
    for x, share in list(shares.items())[:threshold]:
        if len(share) != SHARE_LEN:
            raise SecAggProtocolError(f"share has {len(share)} bytes, expected {SHARE_LEN}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise SecAggProtocolError("share is not a field element (>= PRIME)")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_LEN):
        # Only inconsistent shares can interpolate to a value outside the secret space.
        raise SecAggProtocolError("shares are inconsistent: recovered value exceeds 256 bits")
    return secret.to_bytes(SECRET_LEN, "big")
