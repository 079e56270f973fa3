"""Existing ProcessPoolExecutor code, unchanged but for the import."""

import concurrent.futures as cf
import math

from zexec import ZmqExecutor as ProcessPoolExecutor

PRIMES = [112272535095293, 112582705942171, 112272535095293, 115280095190773,
          115797848077099, 1099726899285419]


def is_prime(n):
    if n % 2 == 0:
        return False
    for i in range(3, int(math.isqrt(n)) + 1, 2):
        if n % i == 0:
            return False
    return True


if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=4) as executor:
        for number, prime in zip(PRIMES, executor.map(is_prime, PRIMES)):
            print(f"{number} is prime: {prime}")
        futures = {executor.submit(pow, 2, k): k for k in (10, 20, 30)}
        for fut in cf.as_completed(futures):
            print(f"2**{futures[fut]} = {fut.result()}")
