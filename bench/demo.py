"""The demo study end to end: cold (fresh store) and fully cached (the second submit).

Runs ``python -m orchestrator submit specs/demo.yaml --store <fresh temporary store>`` twice, offline
(HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1), and prints both wall times, the jobs run and cached,
and the slowest jobs of the cold run (from the executor's own ``done ... (Ns)`` lines).

    python bench/demo.py            # the demo as specified (several minutes on 2 CPUs)
    python bench/demo.py --quick    # two languages only (--set languages=[en,es])
    python bench/demo.py --keep     # keep the store (its path is printed)
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, header, run, table

SPEC = ROOT / "specs" / "demo.yaml"


def submit(store: Path, overrides: list[str]) -> tuple[float, str]:
    cmd = [PYTHON, "-m", "orchestrator", "submit", str(SPEC), "--store", str(store)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    result = run(cmd, cwd=ROOT, check=False)
    seconds = time.perf_counter() - t0
    out = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"submit failed (exit {result.returncode}):\n{out[-4000:]}")
    return seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two languages (en, es) instead of the spec's seven")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = ap.parse_args()
    header("the demo study end to end: cold and fully cached")
    overrides = ["languages=[en,es]"] if args.quick else []
    store = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        cold, out1 = submit(store, overrides)
        warm, out2 = submit(store, overrides)
        ran = re.findall(r"\] done\s+(\S+) \(([\d.]+)s\)", out1)
        cached = re.search(r"(\d+) of (\d+) jobs cached", out2)
        assert cached and cached[1] == cached[2], f"second submit was not fully cached:\n{out2[-2000:]}"
        assert "nothing to run" in out2
        print(
            table(
                ["run", "seconds", "jobs run", "jobs cached"],
                [
                    ["cold (fresh store)", cold, len(ran), 0],
                    ["fully cached (second submit)", warm, 0, int(cached[1])],
                ],
            )
        )
        print(f"\ncached / cold: {warm / cold:.4f}")
        if ran:
            slowest = sorted(ran, key=lambda x: -float(x[1]))[:8]
            print("\nslowest jobs of the cold run (s, as the local executor reports them; 2 run at a time):")
            print(table(["job", "seconds"], [[label, float(s)] for label, s in slowest]))
    finally:
        if args.keep:
            print(f"\nstore kept at {store}")
        else:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
