"""The kernel limits of a sandboxed run that no per-process limit gives: a memory cgroup per run (where the
evaluator may create one) and the seccomp filter that refuses the system calls creating memory no limit counts."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass

# System calls refused inside bwrap, by the machine they run on: (the kernel's AUDIT_ARCH of its native
# ABI, the bit that marks x32 calls on x86-64 or 0, the numbers of memfd_create, shmget, semget, msgget).
# Each of those makes memory that outlives any mapping and is counted by no per-process limit: an
# in-memory file needs no address space to be written, and a System V segment, semaphore set or message
# queue needs no descriptor either. Python programs get POSIX shared memory through /dev/shm instead,
# which the run's tmpfs bounds.
_SECCOMP_REFUSED = {
    "x86_64": (0xC000003E, 0x40000000, (319, 29, 64, 68)),
    "aarch64": (0xC00000B7, 0, (279, 194, 190, 186)),
}
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
_SECCOMP_RET_ALLOW, _SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
logger = logging.getLogger("moce_model.evaluation.sandbox")


@functools.lru_cache(maxsize=1)
def seccomp_filter() -> bytes | None:
    """The classic-BPF program bwrap's --seccomp loads: a refused call, or any call through another ABI
    than the native one (a 32-bit compat or x32 call has other numbers), kills the process with SIGSYS.
    None on a machine not in _SECCOMP_REFUSED.

    Assembled here because libseccomp's Python binding is packaged only for the distribution's own
    interpreter (python3-seccomp), not on PyPI for the project's environment, and the program is a
    dozen instructions (struct seccomp_data: the call's number at offset 0, its ABI at offset 4)."""
    import platform
    import struct

    known = _SECCOMP_REFUSED.get(platform.machine())
    if known is None:
        return None
    arch, x32_bit, refused = known
    checks = [(_BPF_JGE_K, x32_bit)] if x32_bit else []
    checks += [(_BPF_JEQ_K, number) for number in refused]
    length = 3 + len(checks) + 2
    kill = length - 1
    program = [(_BPF_LD_W_ABS, 0, 0, 4), (_BPF_JEQ_K, 0, kill - 2, arch), (_BPF_LD_W_ABS, 0, 0, 0)]
    for opcode, value in checks:
        program.append((opcode, kill - len(program) - 1, 0, value))
    program += [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


@dataclass(frozen=True)
class CgroupParent:
    """A cgroup under which each run can get a child with a memory limit of its own."""

    path: str
    version: int  # 1: the v1 memory hierarchy; 2: the unified one


@dataclass(frozen=True)
class MemoryCgroup:
    """One run's memory cgroup: every process of the run is born in it (see _ENTER_CGROUP), and all the
    memory they cause is charged to it: their RAM, in-memory files, tmpfs pages (the run's /dev/shm,
    /tmp and work directory), System V segments, pipe and socket buffers, page cache. No swap: over the
    limit, the kernel's OOM killer ends a process of the run (cgroup v2: all of them)."""

    path: str
    version: int

    @classmethod
    def create(cls, parent: CgroupParent, limit_bytes: int) -> MemoryCgroup:
        path = os.path.join(parent.path, f"moce-sandbox-{os.getpid()}-{secrets.token_hex(6)}")
        os.mkdir(path, 0o755)
        group = cls(path, parent.version)
        try:
            if group.version == 2:
                group._write("memory.max", limit_bytes)
                group._write("memory.swap.max", 0, optional=True)
                group._write("memory.oom.group", 1, optional=True)
            else:
                group._write("memory.limit_in_bytes", limit_bytes)
                # Memory + swap; absent where the kernel does not account swap.
                group._write("memory.memsw.limit_in_bytes", limit_bytes, optional=True)
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def oom_kills(self) -> int:
        """How many processes of the run the kernel killed for going over the limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as handle:
                fields = dict(line.split() for line in handle if len(line.split()) == 2)
        except OSError:
            return 0
        return int(fields.get("oom_kill", 0))

    def remove(self, wait_s: float = 2.0) -> None:
        """Kills whatever of the run is still in the cgroup and removes it. Under bwrap nothing is left
        once bwrap has exited but processes the kernel is still tearing down; without bwrap a program
        may have left its session, and the cgroup is what still finds it."""
        deadline = time.monotonic() + wait_s
        while True:
            self._kill_members()
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    logger.warning("could not remove the sandbox's memory cgroup %s: %s", self.path, exc)
                    return
            time.sleep(0.01)

    def _kill_members(self) -> None:
        kill_file = os.path.join(self.path, "cgroup.kill")
        if self.version == 2 and os.path.exists(kill_file):
            with contextlib.suppress(OSError):
                self._write("cgroup.kill", 1)
            return
        try:
            with open(self.procs_file, encoding="ascii") as handle:
                members = [int(line) for line in handle if line.strip()]
        except OSError:
            return
        # Without cgroup.kill (v1) the members are signalled one by one; a pid read here belongs to a
        # process of the run, and could be another's only if it exited and its number came round again
        # within these few microseconds.
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        path = os.path.join(self.path, name)
        if optional and not os.path.exists(path):
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(value).encode("ascii"))
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=1)
def memory_cgroup_parent() -> CgroupParent | None:
    """The evaluator's own cgroup, where it may create children with a memory limit: on cgroup v2 when
    its cgroup.subtree_control lists `memory` (the root cgroup of a container, or a delegated cgroup
    whose processes live in a leaf below it), on cgroup v1 in the memory hierarchy. Found through
    /proc/self/cgroup and /proc/self/mountinfo and tried by creating and removing a child; None where
    neither works (then the seccomp filter and the tmpfs sizes are what bound a run's memory)."""
    for parent in _cgroup_candidates():
        try:
            MemoryCgroup.create(parent, 64 * 1024 * 1024).remove()
        except OSError as exc:
            logger.debug("no memory cgroups for the sandbox under %s: %s", parent.path, exc)
            continue
        _remove_abandoned_cgroups(parent)
        return parent
    return None


def _remove_abandoned_cgroups(parent: CgroupParent) -> None:
    """Removes the empty run cgroups of evaluators that are gone: one killed mid-run cannot remove its
    own. Those of live evaluators are left alone, even when empty: a run may be about to enter one."""
    prefix = "moce-sandbox-"
    with contextlib.suppress(OSError):
        for name in os.listdir(parent.path):
            owner = name[len(prefix):].split("-", 1)[0]
            if not name.startswith(prefix) or not owner.isdigit():
                continue
            try:
                os.kill(int(owner), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(parent.path, name))  # refused while a process is still in it


def _cgroup_candidates() -> list[CgroupParent]:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as handle:
            memberships = [line.rstrip("\n").split(":", 2) for line in handle]
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return []
    unified = next((path for hid, names, path in memberships if hid == "0" and names == ""), None)
    v1_memory = next((path for hid, names, path in memberships if "memory" in names.split(",")), None)
    candidates: list[CgroupParent] = []
    for fields in mounts:
        # mountinfo: id parent major:minor root mount-point options [optional...] - type source super-options
        separator = fields.index("-")
        root, mount_point = fields[3], fields[4]
        fstype, super_options = fields[separator + 1], fields[-1].split(",")
        if fstype == "cgroup2" and unified is not None:
            directory = _cgroup_directory(mount_point, root, unified)
            if directory and "memory" in _read_words(os.path.join(directory, "cgroup.subtree_control")):
                candidates.insert(0, CgroupParent(directory, 2))
        elif fstype == "cgroup" and "memory" in super_options and v1_memory is not None:
            directory = _cgroup_directory(mount_point, root, v1_memory)
            if directory and os.path.exists(os.path.join(directory, "memory.limit_in_bytes")):
                candidates.append(CgroupParent(directory, 1))
    return candidates


def _cgroup_directory(mount_point: str, mount_root: str, cgroup_path: str) -> str | None:
    """Where the cgroup `cgroup_path` (as /proc/self/cgroup names it) is under a mount of its hierarchy
    whose root is `mount_root`; None when that mount does not show it."""
    if mount_root != "/":
        if cgroup_path != mount_root and not cgroup_path.startswith(mount_root.rstrip("/") + "/"):
            return None
        cgroup_path = cgroup_path[len(mount_root.rstrip("/")):] or "/"
    directory = os.path.join(mount_point, cgroup_path.lstrip("/"))
    return directory if os.path.isdir(directory) else None


def _read_words(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().split()
    except OSError:
        return []
