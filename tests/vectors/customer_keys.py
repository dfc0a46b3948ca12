#!/usr/bin/env python3
"""Checks Tandem's customer-key test vectors with Python's own hmac module, independently of the
Rust code that derives keys in production (docs/IDENTIFIERS.md describes the derivation).

    python3 tests/vectors/customer_keys.py            # check customer_keys.json
    python3 tests/vectors/customer_keys.py --write    # (re)write it from the inputs below

Each vector gives the raw value a till sent, its normalised form (what the Rust side must produce)
and the key. This script checks key == ck<version>_<kind>_hex(HMAC-SHA256(secret,
"tandem:customer-key:v2" 0x00 kind 0x00 scope 0x00 normalised)).
"""
import hashlib
import hmac
import json
import pathlib
import sys

LABEL = b"tandem:customer-key:v2"
HERE = pathlib.Path(__file__).resolve().parent
VECTORS = HERE / "customer_keys.json"

NETWORK_KEY = {"version": 1, "secret_hex": bytes(range(32)).hex()}
INPUTS = [
    # kind, scope as declared, raw value as sent, normalised
    ("phone", "", "+44 (0)20 7946 0958", "+442079460958"),
    ("phone", "", "0033 6 12 34 56 78", "+33612345678"),
    ("email", "", "  Ana.Martin@Example.COM ", "ana.martin@example.com"),
    ("par", "", "v0010013018276458729101214380", "V0010013018276458729101214380"),
    ("card", "adyen", "8ad0f3c2b1e94d7a", "8ad0f3c2b1e94d7a"),
    ("card", "stripe", "8ad0f3c2b1e94d7a", "8ad0f3c2b1e94d7a"),
    ("member", "coalition-plus", "7992-7398 713", "79927398713"),
]


def derive(secret: bytes, version: int, kind: str, scope: str, normalised: str) -> str:
    message = b"\x00".join([LABEL, kind.encode(), scope.encode(), normalised.encode("utf-8")])
    digest = hmac.new(secret, message, hashlib.sha256).hexdigest()
    return f"ck{version}_{kind}_{digest}"


def main() -> int:
    if "--write" in sys.argv:
        secret = bytes.fromhex(NETWORK_KEY["secret_hex"])
        vectors = [
            {
                "kind": kind,
                "scope": scope,
                "raw": raw,
                "normalised": normalised,
                "key": derive(secret, NETWORK_KEY["version"], kind, scope, normalised),
            }
            for kind, scope, raw, normalised in INPUTS
        ]
        document = {"network_key": NETWORK_KEY, "label": LABEL.decode(), "vectors": vectors}
        VECTORS.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {len(vectors)} vectors to {VECTORS}")
        return 0
    document = json.loads(VECTORS.read_text())
    secret = bytes.fromhex(document["network_key"]["secret_hex"])
    version = document["network_key"]["version"]
    failures = 0
    for vector in document["vectors"]:
        expected = derive(secret, version, vector["kind"], vector["scope"], vector["normalised"])
        if expected != vector["key"]:
            failures += 1
            print(f"MISMATCH {vector['kind']} {vector['raw']!r}: file {vector['key']} python {expected}")
    keys = [vector["key"] for vector in document["vectors"]]
    if len(set(keys)) != len(keys):
        failures += 1
        print("two vectors share a key")
    print(f"{len(keys) - failures} of {len(keys)} customer-key vectors agree with Python's hmac")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
