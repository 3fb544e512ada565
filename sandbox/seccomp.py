"""No exec after start: the seccomp filter the harness installs before candidate code.

    install()        # harness.main, after its own imports, before load_candidate

A classic BPF program, built here with the standard library only (ctypes: the same
filter in the process backend's runtime and in the Docker image, no libseccomp binding
to install). It returns EPERM for DENIED, for clone() with a namespace flag, ENOSYS for
clone3 (whose flags live in memory a filter cannot read: libc falls back to clone, as
under Docker's default profile), and kills the process for a foreign architecture (the
i386 entry points on x86_64) or an x32 system call number. Every thread is covered
(SECCOMP_FILTER_FLAG_TSYNC); every child inherits it; nothing can remove it.

The kernel accepts a filter only with no_new_privs set (both backends set it, the
harness never does: its loss is a finding of tests/attacks) or CAP_SYS_ADMIN. A filter
that cannot be installed is a SetupError: the job never runs unfiltered. The backend
switches it off only for SELFPROG_SABOTAGE (tests), through the environment (ENV).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

ENV = "SELFPROG_SECCOMP"   # "off": TEST ONLY (the backends set it under SELFPROG_SABOTAGE)

# What a sandbox never needs: running another program, debugging or reading other
# processes, mounts and namespaces, kernel keys, eBPF, perf, kernel modules and kexec,
# userfaultfd (a heap-exploit primitive), io_uring (its operations bypass seccomp),
# handle-based opens, swap, reboot, accounting.
DENIED = ("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
          "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen",
          "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "keyctl", "add_key",
          "request_key", "bpf", "perf_event_open", "kexec_load", "kexec_file_load",
          "init_module", "finit_module", "delete_module", "userfaultfd", "io_uring_setup",
          "open_by_handle_at", "swapon", "swapoff", "reboot", "acct")

# System call numbers (asm/unistd_64.h; asm-generic/unistd.h for aarch64).
_SYSCALLS = {
    "x86_64": {
        "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "unshare": 272, "setns": 308, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "keyctl": 250,
        "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "userfaultfd": 323, "io_uring_setup": 425,
        "open_by_handle_at": 304, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
        "clone": 56, "clone3": 435, "seccomp": 317,
    },
    "aarch64": {
        "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "unshare": 97, "setns": 268, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "keyctl": 219,
        "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "userfaultfd": 282, "io_uring_setup": 425,
        "open_by_handle_at": 265, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
        "clone": 220, "clone3": 435, "seccomp": 277,
    },
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (and CLONE_NEWTIME,
# which is 0x80 and only a clone3/unshare flag).
CLONE_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                    | 0x20000000 | 0x40000000 | 0x00000080)

# BPF (linux/filter.h, linux/seccomp.h)
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_NR, _ARCH, _ARG0 = 0, 4, 16            # offsets in struct seccomp_data (little endian)
_SET_MODE_FILTER, _FILTER_FLAG_TSYNC = 1, 1
PR_GET_NO_NEW_PRIVS = 39


class SeccompUnavailable(RuntimeError):
    """The filter cannot be installed here (unknown architecture, no no_new_privs)."""


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter for `machine` (default: this one) as struct sock_filter[]."""
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        raise SeccompUnavailable(f"no seccomp filter for architecture {machine!r}")
    nr = _SYSCALLS[machine]
    eperm = _RET_ERRNO | errno.EPERM
    out = [_insn(_LD_W_ABS, _ARCH),
           _insn(_JEQ_K, _AUDIT_ARCH[machine], jt=1),
           _insn(_RET_K, _RET_KILL_PROCESS),
           _insn(_LD_W_ABS, _NR)]
    if machine == "x86_64":
        out += [_insn(_JGE_K, _X32_SYSCALL_BIT, jf=1), _insn(_RET_K, _RET_KILL_PROCESS)]
    for name in DENIED:
        out += [_insn(_JEQ_K, nr[name], jf=1), _insn(_RET_K, eperm)]
    out += [_insn(_JEQ_K, nr["clone3"], jf=1), _insn(_RET_K, _RET_ERRNO | errno.ENOSYS),
            _insn(_JEQ_K, nr["clone"], jf=3),
            _insn(_LD_W_ABS, _ARG0),                     # the flags' low word
            _insn(_JSET_K, CLONE_NAMESPACES, jf=1),
            _insn(_RET_K, eperm),
            _insn(_RET_K, _RET_ALLOW)]
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install the filter on every thread of this process (see the module docstring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise SeccompUnavailable("no_new_privs is not set: the kernel would refuse the filter")
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(ctypes.c_long(_SYSCALLS[platform.machine()]["seccomp"]),
                      ctypes.c_ulong(_SET_MODE_FILTER), ctypes.c_ulong(_FILTER_FLAG_TSYNC),
                      ctypes.byref(prog))
    if rc != 0:
        err = ctypes.get_errno()
        raise SeccompUnavailable(f"seccomp(SET_MODE_FILTER) failed: rc {rc}, "
                                 f"{os.strerror(err) if rc < 0 else 'thread ' + str(rc)}")


def wanted() -> bool:
    return os.environ.get(ENV, "") != "off"
