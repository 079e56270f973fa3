"""Engine-targeted work: a DirectView per engine keeps state on that engine."""

import os

from zexec import EngineDiedError, LocalCluster


def remember(key, value):
    import builtins
    store = builtins.__dict__.setdefault("_zexec_store", {})
    store[key] = value
    return os.getpid()


def recall(key):
    import builtins
    return builtins.__dict__.get("_zexec_store", {}).get(key)


if __name__ == "__main__":
    cluster = LocalCluster(2)
    with cluster as ex:
        first, second = (ex.engine(i) for i in ex.engines)
        pid = first.submit(remember, "answer", 42).result()
        print(f"stored on engine {first.engine_id} (pid {pid})")
        print("engine", first.engine_id, "recalls", first.submit(recall, "answer").result())
        print("engine", second.engine_id, "recalls", second.submit(recall, "answer").result())
        # an engine that dies fails exactly its own tasks; the cluster replaces it
        try:
            first.submit(os._exit, 3).result()
        except EngineDiedError as e:
            print("as expected:", e)
        cluster.wait_for_engines(ex.client)  # until the replacement has registered
        print("still serving:", ex.submit(pow, 2, 10).result(), "engines now", ex.engines)
