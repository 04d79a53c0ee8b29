"""One trial at a time prepares a data variant, whichever nodes the trials run on and wherever the sweep
folder is (a local folder, a shared filesystem or S3): a claim in the sweep's storage, not a file lock.

What needs excluding: two trials preparing one variant into one folder at once. The stages' own markers
(``_stage.json``, ``manifest.json`` written last) make a later run skip finished work, but two writers
interleaving could leave shards tokenized with a tokenizer the other one trained (training on Ray Data's
row order is not promised to repeat). fcntl locks hold on one machine's disk only, and S3 has no locks.
S3 (since 2024; MinIO and moto too) can create an object only if it is absent (``If-None-Match: *``), and
a local or NFS folder can by a hard link (see ``Location.write_new``): of two trials creating
``claim-0.json``, exactly one succeeds. The holder rewrites its claim every ``HEARTBEAT_S`` seconds while it
works and marks it released when done or failed. A waiter polls: the work done (its marker exists) ->
nothing to do; the newest claim released, or unchanged for ``STALE_S`` seconds of the waiter's own clock
(its holder died: a killed trial runs no clean-up) -> it creates the next claim, ``claim-<n+1>.json``,
which again only one waiter gets, and continues the dead holder's work (the stages resume). A trial takes
a claim of its own name over at once: its earlier attempt, before the sweep was restored, is dead.

A lease that expired by itself would need a compare-and-swap on the claim (S3's If-Match), and the clocks
of the nodes and of S3 to agree; numbered claims need neither. The one overlap left: a holder frozen for
STALE_S seconds (heartbeats and all) that wakes up and goes on writing.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from typing import Callable

from llm_ray.storage import Location

HEARTBEAT_S = 15.0
STALE_S = 300.0  # 20 heartbeats missed: its holder is gone
POLL_S = 2.0
_CLAIM = re.compile(r"claim-(\d+)\.json")


def newest_claim(folder: Location) -> tuple[int, dict | None]:
    """(number, record) of the newest claim in folder; (-1, None) when there is none."""
    numbers = [int(m[1]) for item in folder.iterdir() if (m := _CLAIM.fullmatch(item.name))]
    if not numbers:
        return -1, None
    n = max(numbers)
    try:
        return n, (folder / f"claim-{n}.json").read_json()
    except (OSError, ValueError):
        return n, {}  # claims are written whole: it just went; the next look sees what replaced it


class _Heartbeat:
    """Rewrites a held claim every HEARTBEAT_S seconds until stopped; then marks it released."""

    def __init__(self, claim: Location, record: dict):
        self.claim, self.record = claim, dict(record)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llm-ray-claim-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.record["beat"] += 1
            try:
                self.claim.write_json(self.record)
            except Exception:  # a storage hiccup: the next beat tries again, STALE_S allows many misses
                pass

    def release(self) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.claim.write_json({**self.record, "released": True})
        except Exception:  # never masks the work's own error; waiters then take over after STALE_S
            pass


def _holds(claim: Location, record: dict) -> bool:
    """Whether claim is this record's, though its creation said otherwise (a retried request that had
    succeeded the first time)."""
    try:
        return claim.read_json().get("token") == record["token"]
    except (OSError, ValueError):
        return False


def run_once(folder: Location, done: Location, owner: str, work: Callable[[], None], log=print,
             clock=time.monotonic, sleep=time.sleep) -> bool:
    """Run work() unless the file done exists, never while another owner runs it under folder's claims:
    True when this call ran it, False when another owner's work is done. work() must create done when
    it succeeds; when it raises, the claim is released and the error propagates."""
    seen, since = None, clock()
    waiting = False
    while True:
        if done.is_file():
            return False
        n, record = newest_claim(folder)
        if (n, record) != seen:
            seen, since = (n, record), clock()
        free = (record is None or record.get("released") or record.get("owner") == owner
                or clock() - since >= STALE_S)
        if free:
            if record is not None and not record.get("released") and record.get("owner") != owner:
                log(f"tune: {folder} claim-{n} by {record.get('owner')} unchanged for {STALE_S:.0f} s: taking over")
            mine = {"owner": owner, "token": secrets.token_hex(8), "beat": 0}
            claim = folder / f"claim-{n + 1}.json"
            if claim.write_new(json.dumps(mine).encode()) or _holds(claim, mine):
                heartbeat = _Heartbeat(claim, mine)
                try:
                    if done.is_file():  # finished between the look above and the claim
                        return False
                    work()
                    return True
                finally:
                    heartbeat.release()
            continue  # another owner got it first: look again
        if not waiting:
            log(f"tune: {owner} waits for {record.get('owner')} to finish preparing ({folder})")
            waiting = True
        sleep(POLL_S)
