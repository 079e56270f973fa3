"""zexec in ten lines: a LocalCluster, load-balanced tasks, and one engine targeted."""

import os
import time

from zexec import LocalCluster


def slow_square(x):
    time.sleep(0.01)
    return x * x


if __name__ == "__main__":
    t0 = time.perf_counter()
    with LocalCluster(4) as ex:                      # hub, schedulers, heartbeat, 4 engines
        t_up = time.perf_counter() - t0
        squares = list(ex.map(slow_square, range(100)))     # load-balanced
        total = ex.submit(sum, squares).result()
        pids = {ex.engine(i).submit(os.getpid).result() for i in ex.engines}  # one per engine
        print(f"cluster up in {t_up:.2f}s with engines {ex.engines}")
        print(f"sum of squares 0..99 = {total}; engine pids {sorted(pids)}")
    print(f"done in {time.perf_counter() - t0:.2f}s, every process stopped")
