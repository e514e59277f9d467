#!/usr/bin/env python3
"""The damage guard on a real run: sequential edits of the first N CounterFact records on one
`guard` session of a running emend server, each accepted or refused with its canary reading,
then the session's damage curve saved as JSON, CSV and SVG.

    python3 scripts/canary/guard_run.py --url http://127.0.0.1:8080 --method rome --n 40 \
        --out docs/canary/rome-guard-40
"""
import argparse
import json
import time
import urllib.error
import urllib.request


def call(url, method="GET", body=None, raw=False):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            payload = r.read()
            return r.status, (payload if raw else json.loads(payload))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--budget", default=None, help="budget JSON (default: the server's)")
    ap.add_argument("--data", default="../shared/data/counterfact/counterfact-edit.json")
    ap.add_argument("--out", required=True, help="path prefix of the .json/.csv/.svg files")
    a = ap.parse_args()
    ids = [r["case_id"] for r in json.load(open(a.data))][: a.n]
    canary = {"mode": "guard"}
    if a.budget:
        canary["budget"] = json.loads(a.budget)
    s, sess = call(f"{a.url}/v1/sessions", "POST", {"name": f"guard-run-{a.method}", "canary": canary})
    assert s == 201, sess
    sid = sess["id"]
    print(f"session {sid} budget {sess['canary']['budget']}")
    log = []
    t0 = time.time()
    for i, rid in enumerate(ids):
        t = time.time()
        s, r = call(f"{a.url}/v1/sessions/{sid}/edits", "POST",
                    {"method": a.method, "edits": [{"dataset": "counterfact", "id": rid}]})
        reading = r["versions"][0]["canary"] if s == 201 else r.get("canary")
        if reading is None:
            raise SystemExit(f"record {rid}: {s} {r}")
        d = reading["drift"]
        outcome = "accepted" if s == 201 else "refused"
        log.append({"record": rid, "status": s, "outcome": outcome, "reading": reading,
                    "seconds": time.time() - t})
        print(f"{i + 1:3d} record {rid:5d} {outcome:8s} ppl_ratio {d['perplexity_ratio']:.4f} "
              f"acc_drop {d['accuracy_drop']:+.2f} flips {d['neighbour_flips']} "
              f"breaches {[b['limit'] for b in reading['breaches']]} "
              f"canary {reading['duration_ms'] / 1000:.1f}s request {time.time() - t:.1f}s", flush=True)
    wall = time.time() - t0
    _, curve = call(f"{a.url}/v1/sessions/{sid}/damage")
    _, csv = call(f"{a.url}/v1/sessions/{sid}/damage?format=csv", raw=True)
    s, svg = call(f"{a.url}/v1/sessions/{sid}/damage?format=svg", raw=True)
    json.dump({"session": sid, "method": a.method, "wall_seconds": wall, "edits": log,
               "curve": curve}, open(a.out + ".json", "w"), indent=1)
    open(a.out + ".csv", "wb").write(csv)
    if s == 200:
        open(a.out + ".svg", "wb").write(svg)
    acc = sum(e["outcome"] == "accepted" for e in log)
    print(f"{acc} accepted, {len(log) - acc} refused, {wall:.0f} s")


if __name__ == "__main__":
    main()
