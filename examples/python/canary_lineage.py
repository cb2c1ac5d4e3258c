"""A canary rollout with lineage, from Python (ctypes): an engine with a store in a temporary
folder, all-MiniLM-L6-v2 registered twice (f32 weights, then int8) as two versions of the name
"embed", f32 in production, int8 as a 30% canary sticky by routing key; a few keyed requests,
the route and version that answered each, one request's lineage record, then the promotion.

    PYTHONPATH=examples/python python3 examples/python/canary_lineage.py MINILM_DIR

Exits non-zero if any answer does not match its route, or a record does not name the version
that answered.
"""

import json
import sys
import tempfile

import keel

TEXTS = ["Keel routes each tenant to one version.", "A canary gets a share of the traffic."]
KEYS = [f"tenant-{i}" for i in range(10)]


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} MINILM_DIR")
    minilm = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="keel-canary-") as store:
        with keel.Engine(storage_path=store) as engine:
            f32 = engine.register("embed", minilm, weights=keel.WEIGHTS_F32, retain_input=True)
            int8 = engine.register("embed", minilm, weights=keel.WEIGHTS_INT8, retain_input=True)
            print(f"registered embed: f32 {f32[:12]}, int8 {int8[:12]}")
            engine.set_alias("embed", "production", f32, reason="first release")
            engine.canary("embed", int8, 30, reason="try the int8 weights")

            answers = {}
            for key in KEYS:
                answer = engine.infer_embed("embed", TEXTS, request_id=f"req-{key}", key=key)
                expected = int8 if answer.route == "canary" else f32
                assert answer.route in ("production", "canary"), answer
                assert answer.version == expected, answer
                assert answer.request_id == f"req-{key}", answer
                # Sticky: the same key takes the same route again.
                again = engine.infer_embed("embed", TEXTS, key=key)
                assert (again.route, again.version) == (answer.route, answer.version), (again, answer)
                answers[key] = answer
                print(f"{key:<10} {answer.request_id:<14} route {answer.route:<10} version {answer.version[:12]}")
            routes = [a.route for a in answers.values()]
            print(f"{routes.count('canary')} of {len(routes)} keys on the canary")

            # Look one request up: a canary one if there is any.
            answer = next((a for a in answers.values() if a.route == "canary"), next(iter(answers.values())))
            record = engine.lineage_show(answer.request_id)
            assert record["request_id"] == answer.request_id, record
            assert record["version"] == answer.version, record
            assert record["route"] == answer.route, record
            shown = {k: record[k] for k in ("request_id", "key", "model", "version", "weights", "route",
                                            "route_reason", "backend", "cache_hit", "time")}
            print("lineage of", answer.request_id, json.dumps(shown, indent=2))
            assert engine.lineage_replay(answer.request_id), "the replay differs from the recorded output"
            print("replayed: identical")

            engine.promote("embed", reason="int8 is within tolerance")
            after = engine.infer_embed("embed", TEXTS, key=KEYS[0])
            assert (after.route, after.version) == ("production", int8), after
            print(f"promoted: production is {int8[:12]}; history:")
            for event in engine.history("embed"):
                frm, to = (event[k][:12] if event[k] else "-" for k in ("from", "to"))
                print(f"  {event['seq']:>3} {event['alias']:<10} {frm:<12} -> {to:<12} {event['reason']}")
    assert keel.live_handles() == 0, f"{keel.live_handles()} handles left live"


if __name__ == "__main__":
    main()
