"""Mean GPU duration per kernel (us) from an `ncu --csv --metrics gpu__time_duration.sum` log; the sum of
the means is the selection's device time per call (kernels serialised by the profiler)."""
import csv
import sys
from collections import OrderedDict

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
        name = r["Kernel Name"].replace("(anonymous namespace)::", "").split("(")[0]
        rows.append((name, v * scale))
acc = OrderedDict()
for name, us in rows:
    acc.setdefault(name, []).append(us)
total = 0.0
for name, v in acc.items():
    m = sum(v) / len(v)
    total += m
    print(f"  {name:28s} n={len(v):3d} mean {m:8.2f} us  min {min(v):8.2f}")
print(f"  {'sum of means':28s}       {total:8.2f} us")
