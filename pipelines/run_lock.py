"""One writer per run: a claim object created atomically at run start and proven before every destructive step.

The claim ``OUTPUT/_locks/run_date=D/run_id=ID.json`` records a unique attempt token, the host, boot id, PID
namespace and pid of the process that holds it, and is rewritten by compare-and-swap (a heartbeat thread, every
``timeout / 5`` seconds). Rules:

* acquire: create-if-absent; if a claim exists it is taken over (compare-and-swap on the version read) only
  when it is abandoned: the store says it was last written more than ``storage.lock_timeout_s`` ago (the
  store's own clock, so clock skew between hosts cannot expire a live claim), or it was made on this host, in
  this boot and this PID namespace, by a process that no longer exists (a crashed or killed run, so an
  immediate rerun works; a holder in another container on the same host only expires by age);
* otherwise the run fails at once with ``RunLocked`` naming the holder;
* before anything destructive (clearing an earlier attempt, the ledger entry, the reports, the manifest) the
  attempt proves it still holds the claim by rewriting it with compare-and-swap (``refresh``): if another
  attempt took over, this one fails with ``ClaimLost``. A successful refresh leaves a full timeout of
  undisputed ownership for the step that follows;
* release is a conditional delete of this attempt's own version of the claim, never another attempt's.
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
from functools import lru_cache
from typing import Callable, Optional

from labelnext.ops.io.objects import ObjectStore, PreconditionFailed, StorageError

log = logging.getLogger("labelnext")


class RunLocked(StorageError):
    """Another live attempt holds this run id."""


class ClaimLost(StorageError):
    """This attempt's claim was taken over; it must not write or delete anything more."""


@lru_cache(maxsize=1)
def boot_id() -> str:
    """This kernel boot's id (Linux); empty where the system does not expose one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """The PID namespace this process lives in (``pid:[inode]``); empty where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True)
class Holder:
    attempt: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: float  # the holder's clock, for people reading the claim; expiry uses the store's clock
    boot_id: str = ""
    pid_ns: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        try:
            raw = json.loads(data.decode("utf-8"))
            return cls(str(raw["attempt"]), str(raw["host"]), int(raw["pid"]), str(raw["started_at"]),
                       float(raw["heartbeat_at"]), str(raw.get("boot_id", "")), str(raw.get("pid_ns", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def same_process_space(self, host: str, boot: str, pid_ns: str) -> bool:
        """True when this holder's pid can be looked up from here: same host, same boot, same PID namespace."""
        return bool(boot and pid_ns) and (self.host, self.boot_id, self.pid_ns) == (host, boot, pid_ns)


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
        self.boot_id = boot_id()
        self.pid_ns = pid_namespace()
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat()
        self._tag: Optional[str] = None
        self._lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._mutex = threading.Lock()

    def _holder(self) -> Holder:
        return Holder(self.attempt, self.host, self.pid, self.started_at, self.clock(), self.boot_id, self.pid_ns)

    def abandoned(self, holder: Optional[Holder], age_s: float) -> bool:
        """``age_s``: seconds since the claim was last written, by the store's clock."""
        if holder is None:  # unreadable claim: nobody can refresh it, treat it as abandoned
            return True
        if age_s > self.timeout_s:
            return True
        return (holder.same_process_space(self.host, self.boot_id, self.pid_ns) and holder.pid != self.pid
                and not _process_alive(holder.pid))

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
            if holder is not None and not self.abandoned(holder, current.age_s):
                raise RunLocked(
                    f"run {self.label} is already being written by attempt {holder.attempt} "
                    f"(host {holder.host}, pid {holder.pid}, claim last renewed {current.age_s:.0f}s ago); a claim "
                    f"counts as abandoned {self.timeout_s:.0f}s after its last renewal (storage.lock_timeout_s)"
                )
            try:
                self._tag = self.store.put(self.path, self._holder().to_bytes(), if_tag=current.tag)
            except PreconditionFailed:
                raise RunLocked(f"run {self.label}: another attempt took over its abandoned claim first") from None
            log.warning("run %s: took over the abandoned claim of attempt %s", self.label,
                        holder.attempt if holder else "<unreadable>")
            return
        raise RunLocked(f"run {self.label}: its claim keeps changing; is another attempt starting?")

    def _lost_error(self) -> ClaimLost:
        return ClaimLost(f"run {self.label}: another attempt took over the claim of this attempt ({self.attempt}) "
                         "while it was stalled; stopping without writing or deleting anything more")

    def refresh(self) -> None:
        """Prove the claim is still ours by rewriting it with compare-and-swap; ``ClaimLost`` if it is not."""
        with self._mutex:
            if self._lost or self._tag is None:
                raise self._lost_error()
            try:
                self._tag = self.store.put(self.path, self._holder().to_bytes(), if_tag=self._tag)
            except PreconditionFailed:
                current = self.store.get(self.path)
                holder = Holder.parse(current.data) if current is not None else None
                if current is not None and holder is not None and holder.attempt == self.attempt:
                    self._tag = current.tag  # a retried write of ours had already gone through
                    return
                self._lost = True
                raise self._lost_error() from None

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.attempt}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            try:
                self.refresh()
            except ClaimLost:
                return  # the run's next destructive step fails with the message
            except Exception as exc:  # transient storage errors: the next beat or step proves the claim again
                log.warning("run %s: claim heartbeat failed (%s)", self.label, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the claim, only in the version this attempt wrote last."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            if self._lost or self._tag is None:
                return
            try:
                self.store.delete(self.path, if_tag=self._tag)
            except PreconditionFailed:
                log.info("run %s: the claim is no longer this attempt's; left in place", self.label)
            self._tag = None
