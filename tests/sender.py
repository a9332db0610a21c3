"""A web process, as far as mail goes: sends in the request (mode ``hybrid``) in a loop,
as a view would, for ``--seconds`` at about ``--rate`` sends a second; prints the count
of each receipt status as JSON at the end. Started by tests/test_shared_limits.py and
bench/scale.py with the test settings (``KIPEKEE_TEST_SETTINGS``, the database's env).

    python -m tests.sender --seconds 5 --rate 10 --tag web1
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--tag", default="web")
    parser.add_argument("--start-file", default="",
                        help="start once this file exists (all senders at once)")
    args = parser.parse_args()

    import django

    django.setup()
    import kipekee
    from django.db import close_old_connections

    import os

    statuses: Counter[str] = Counter()
    print("ready", flush=True)
    while args.start_file and not os.path.exists(args.start_file):
        time.sleep(0.05)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < args.seconds:
        receipt = kipekee.send(subject=f"{args.tag} {sent}", text="Thanks for your order.",
                               from_email="shop@example.com", to=[f"{args.tag}-{sent}@example.com"],
                               mode="hybrid")
        statuses[receipt.status] += 1
        sent += 1
        close_old_connections()  # as at the end of a request
        pause = started + sent / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(json.dumps(dict(statuses)), flush=True)


if __name__ == "__main__":
    main()
