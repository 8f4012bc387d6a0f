"""``python -m pydhsa.evals speed-worker JSON``: one measured configuration of ``pydhsa bench`` in this fresh
process (pydhsa.evals.speed.spawn_worker starts it); prints the result as one JSON line."""
import json
import sys

from .speed import speed_worker

if len(sys.argv) == 3 and sys.argv[1] == "speed-worker":
    print(json.dumps(speed_worker(json.loads(sys.argv[2]))), flush=True)
    sys.exit(0)
print("usage: python -m pydhsa.evals speed-worker JSON (internal; use `pydhsa niah|ruler|bench`)", file=sys.stderr)
sys.exit(2)
