"""One writer per run: a claim object created atomically at run start and checked before the manifest.

The claim ``OUTPUT/_locks/run_date=D/run_id=ID.json`` records a unique attempt token, host, pid and a
heartbeat that a background thread refreshes by compare-and-swap every ``timeout / 5`` seconds. Rules:

* acquire: create-if-absent; if a claim exists it is taken over (compare-and-swap on the version read) only
  when it is abandoned: its heartbeat is older than ``storage.lock_timeout_s``, or it was made on this host
  by a process that no longer exists (a crashed or killed run, so an immediate rerun works);
* otherwise the run fails at once with ``RunLocked`` naming the holder;
* before the manifest the attempt refreshes the claim by compare-and-swap: if another attempt took over,
  this one fails with ``ClaimLost`` and writes no manifest. A successful refresh leaves a full timeout of
  undisputed ownership in which the manifest is written;
* the claim is deleted after the manifest (or when the run fails), never by another attempt.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from labelnext.ops.objects import ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger("labelnext")


class RunLocked(StorageError):
    """Another live attempt holds this run id."""


class ClaimLost(StorageError):
    """This attempt's claim was taken over; it must not commit."""


@dataclass(frozen=True)
class Holder:
    attempt: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: float  # epoch seconds

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(str(raw["attempt"]), str(raw["host"]), int(raw["pid"]), str(raw["started_at"]),
                       float(raw["heartbeat_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunClaim:
    def __init__(self, store: ObjectStore, path: str, label: str, timeout_s: float,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.path = path
        self.label = label
        self.timeout_s = timeout_s
        self.clock = clock
        self.attempt = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat()
        self._tag: Optional[str] = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mutex = threading.Lock()

    def _holder(self) -> Holder:
        return Holder(self.attempt, self.host, self.pid, self.started_at, self.clock())

    def abandoned(self, holder: Optional[Holder]) -> bool:
        if holder is None:  # unreadable claim: nobody can refresh it, treat it as abandoned
            return True
        if self.clock() - holder.heartbeat_at > self.timeout_s:
            return True
        return holder.host == self.host and holder.pid != self.pid and not _process_alive(holder.pid)

    def acquire(self) -> None:
        for _ in range(3):  # a claim released between our create and our read: try again
            try:
                self._tag = self.store.put(self.path, self._holder().to_bytes(), if_absent=True)
                return
            except PreconditionFailed:
                pass
            current = self.store.get(self.path)
            if current is None:
                continue
            holder = Holder.parse(current.data)
            if holder is not None and holder.attempt == self.attempt:  # our create went through; its reply was lost
                self._tag = current.tag
                return
            if holder is not None and not self.abandoned(holder):
                age = self.clock() - holder.heartbeat_at
                raise RunLocked(
                    f"run {self.label} is already being written by attempt {holder.attempt} "
                    f"(host {holder.host}, pid {holder.pid}, last heartbeat {age:.0f}s ago); a claim counts as "
                    f"abandoned {self.timeout_s:.0f}s after its last heartbeat (storage.lock_timeout_s)"
                )
            try:
                self._tag = self.store.put(self.path, self._holder().to_bytes(), if_tag=current.tag)
            except PreconditionFailed:
                raise RunLocked(f"run {self.label}: another attempt took over its abandoned claim first") from None
            log.warning("run %s: took over the abandoned claim of attempt %s", self.label,
                        holder.attempt if holder else "<unreadable>")
            return
        raise RunLocked(f"run {self.label}: its claim keeps changing; is another attempt starting?")

    def refresh(self) -> None:
        """Extend the claim by compare-and-swap; ``ClaimLost`` when another attempt owns it now."""
        with self._mutex:
            if self._lost or self._tag is None:
                raise ClaimLost(f"run {self.label}: this attempt ({self.attempt}) no longer holds the run's claim")
            try:
                self._tag = self.store.put(self.path, self._holder().to_bytes(), if_tag=self._tag)
            except PreconditionFailed:
                current = self.store.get(self.path)
                holder = Holder.parse(current.data) if current is not None else None
                if current is not None and holder is not None and holder.attempt == self.attempt:
                    self._tag = current.tag  # a retried write of ours had already gone through
                    return
                self._lost = True
                raise ClaimLost(
                    f"run {self.label}: another attempt took over the claim of this attempt ({self.attempt}); "
                    "not committing"
                ) from None

    def ensure_held(self) -> None:
        """Fail fast, without a round trip, once the heartbeat has seen another attempt take over."""
        if self._lost:
            raise ClaimLost(f"run {self.label}: another attempt took over the claim of this attempt "
                            f"({self.attempt}); stopping before writing more")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.attempt}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            try:
                self.refresh()
            except ClaimLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # transient storage errors: keep trying until the claim expires
                log.warning("run %s: claim heartbeat failed (%s)", self.label, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the claim if this attempt still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            if self._lost or self._tag is None:
                return
            current = self.store.get(self.path)
            if current is not None and current.tag == self._tag:
                self.store.delete(self.path)
            self._tag = None
