"""Cost of access-token validation per token, in microseconds: cached and uncached, RS256 and ES256.

``python -m bench.bench_tokens [--seconds S] [--json]``

Times :meth:`TokenValidator.validate` on Keycloak-shaped tokens (RSA 2048 /
P-256) with the key set loaded in memory (no network: this is the CPU cost of
a validation, not of JWKS fetching):

- ``uncached``: the full path every new token pays (hash, header, alg/key
  checks, signature, claims, identity), with the decoded-token cache off;
- ``cached``: a token seen before (hash + LRU lookup + expiry/key check);
- ``pyjwt.decode``: PyJWT's own decode with signature, iss, aud and exp checks, for reference;
- ``signature only``: the bare OpenSSL signature check, the floor under all of the above
  (on a loaded machine every figure rises; compare them with this one).

Each figure is the median of several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import jwt.utils
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.config import OidcConfig
from proxy.identity.jwks import parse_jwks
from proxy.identity.tokens import TokenValidator

ROUNDS = 7
ISSUER = "https://keycloak.bench/realms/iot"
AUDIENCE = "iot-proxy"


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"exp": now + 3600, "iat": now, "jti": str(uuid.uuid4()), "iss": ISSUER, "aud": [AUDIENCE, "account"],
            "sub": str(uuid.uuid4()), "typ": "Bearer", "azp": "iot-portal", "preferred_username": "alice",
            "scope": "openid profile email", "realm_access": {"roles": ["iot-user", "default-roles-iot"]},
            "resource_access": {"iot-proxy": {"roles": ["reader"]}, "account": {"roles": ["view-profile"]}},
            "groups": ["/users"]}


def _keys() -> dict[str, tuple[Any, dict[str, Any]]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "RS256": (rsa_key, {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "rsa", "alg": "RS256",
                            "use": "sig"}),
        "ES256": (ec_key, {**json.loads(ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec", "alg": "ES256",
                           "use": "sig"}),
    }


def _validator(jwks: dict[str, Any], cache_size: int) -> TokenValidator:
    v = TokenValidator(OidcConfig(issuer=ISSUER, audience=AUDIENCE, token_cache_size=cache_size,
                                  roles=("realm_access.roles", "resource_access.iot-proxy.roles")))
    v.keyset.keys = parse_jwks(jwks, v.algorithms)
    v.keyset.loaded = True
    return v


async def _time_async(fn: Callable[[], Awaitable[Any]], seconds: float) -> float:
    """Median µs per call over ROUNDS rounds of about seconds/ROUNDS each."""
    n = 1
    while True:  # calibrate a batch that takes ~10 ms
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        if time.perf_counter() - t0 > 0.01:
            break
        n *= 2
    per_round = max(1, int(n * (seconds / ROUNDS) / 0.01))
    results = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(per_round):
            await fn()
        results.append((time.perf_counter() - t0) / per_round * 1e6)
    return statistics.median(results)


async def measure(seconds: float = 1.0) -> dict[str, float]:
    keys = _keys()
    jwks = {"keys": [jwk for _, jwk in keys.values()]}
    uncached, cached = _validator(jwks, 0), _validator(jwks, 10000)
    out: dict[str, float] = {}
    for alg, (private, jwk) in keys.items():
        token = jwt.encode(_claims(), private, algorithm=alg, headers={"kid": jwk["kid"]})
        public = private.public_key()
        assert (await uncached.validate(token)).username == "alice"
        assert (await cached.validate(token)).username == "alice"
        # Each closure below is timed (awaited) within its iteration, so the loop variables are the current ones.
        out[f"{alg} uncached"] = await _time_async(lambda: uncached.validate(token), seconds)  # noqa: B023
        out[f"{alg} cached"] = await _time_async(lambda: cached.validate(token), seconds)  # noqa: B023

        async def pyjwt_decode() -> Any:
            return jwt.decode(token, public, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)  # noqa: B023

        out[f"{alg} pyjwt.decode"] = await _time_async(pyjwt_decode, seconds)

        head, payload, sig = token.split(".")
        signing_input, signature = f"{head}.{payload}".encode(), jwt.utils.base64url_decode(sig)
        key = uncached.keyset.keys[jwk["kid"]]

        async def signature_only() -> Any:
            return key.verify(alg, signing_input, signature)  # noqa: B023

        out[f"{alg} signature only"] = await _time_async(signature_only, seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_tokens", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="time per case (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    results = asyncio.run(measure(args.seconds))
    if args.json:
        print(json.dumps({k: round(v, 2) for k, v in results.items()}))
    else:
        print(f"{'case':<22} {'µs/token':>10}")
        for name, us in results.items():
            print(f"{name:<22} {us:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
