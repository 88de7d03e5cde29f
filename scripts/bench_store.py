"""Measure feature-store lookups against 100,000 synthetic entries, on local disk and on moto's S3 server
(loopback), and print the numbers docs/store.md quotes.

The entries are synthetic (random sha256s and features): a lookup's cost depends on the number of rows and
parts, not on what the features are. Each case: the store as embed leaves it (parts of 1,000 rows) and after
`compact()` (one part); a lookup of 1,000 stored sha256s plus 1,000 unknown ones, by a fresh reader (it
reads every part's sha256 column) and again by the same reader (keys cached).

Example: .venv/bin/python scripts/bench_store.py --entries 100000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from m9.config import FEATURE_DIM
from m9.store import FeatureStore, rows

IDENTITY = {"weights": "synthetic", "runtime": "onnx", "precision": "fp32", "preprocess": 2, "decode_memory_mb": 2048}
PART_ROWS = 1000


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def fill(uri: str, entries: int) -> float:
    store = FeatureStore(uri).model(IDENTITY)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, entries, PART_ROWS):
        n = min(PART_ROWS, entries - start)
        shas = [_sha(i) for i in range(start, start + n)]
        store.add(rows(shas, rng.random((n, FEATURE_DIM), np.float32), [None] * n))
    return time.perf_counter() - started


def lookups(uri: str, entries: int) -> dict:
    """Seconds per lookup: 1,000 unknown sha256s (only the keys are read), 1,000 stored ones added by one
    earlier run (neighbours in the store, as a second workdir on the same images finds them) and 1,000
    spread at random over the store (the worst case: a row group read per hit); each by a fresh reader
    (cold: reads every part's keys) and by the same reader again (warm: keys cached)."""
    rng = np.random.default_rng(1)
    start = int(rng.integers(0, entries - 1000))
    queries = {
        "misses": [_sha(entries + i) for i in range(1000)],
        "clustered_hits": [_sha(i) for i in range(start, start + 1000)],
        "random_hits": [_sha(int(i)) for i in rng.choice(entries, 1000, replace=False)],
    }
    out = {}
    for what, shas in queries.items():
        store = FeatureStore(uri).model(IDENTITY)
        for name in ("cold", "warm"):
            started = time.perf_counter()
            found = store.lookup(shas)
            out[f"{what}_{name}_s"] = round(time.perf_counter() - started, 3)
            assert found.num_rows == (0 if what == "misses" else 1000), found.num_rows
    return out


def case(uri: str, entries: int, compact: bool = True) -> dict:
    result = {"uri": uri, "entries": entries, "fill_s": round(fill(uri, entries), 1)}
    result["parts_1000_rows"] = lookups(uri, entries)
    if not compact:
        return result
    started = time.perf_counter()
    FeatureStore(uri).model(IDENTITY).compact()
    result["compact_s"] = round(time.perf_counter() - started, 1)
    result["one_part"] = lookups(uri, entries)
    [shown] = FeatureStore(uri).show()
    result["bytes"] = shown.bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--s3-only", action="store_true", help="Skip the local store.")
    args = parser.parse_args()
    results = []
    if not args.s3_only:
        results.append(case(os.path.join(tempfile.mkdtemp(prefix="m9-store-bench-"), "store"), args.entries))
        print(json.dumps(results[0]), flush=True)

    import boto3

    # moto in its own process: in this one it shares the GIL with the reader and starves its large GETs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        M9_S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        # No compact on moto: its server did not answer range reads of the 580 MB merged part within
        # pyarrow's low-speed limit (less than 1 byte/s for 3 s), a limit of moto's server, not of S3.
        results.append(case("s3://bench/store", args.entries, compact=False))
    finally:
        server.terminate()
        server.wait()
    print(json.dumps(results, indent=2), flush=True)


if __name__ == "__main__":
    main()
