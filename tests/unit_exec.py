"""
Run a command under the restrictions a systemd unit applies that a process
can apply to itself, so a test sees what the daemon sees under the unit:

- ``MemoryDenyWriteExecute=yes``: no memory that is both writable and
  executable, the kernel's ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``
  (the rule systemd's seccomp filter enforces, and systemd itself uses on
  kernels that have it);
- ``NoNewPrivileges=yes``: ``prctl(PR_SET_NO_NEW_PRIVS)``.

    python tests/unit_exec.py UNIT_FILE [--mdwe] -- COMMAND [ARGS...]

``--mdwe`` applies the write+execute rule whatever the unit says.  Exits 75
when the kernel lacks PR_SET_MDWE and the rule was asked for.
"""

import ctypes
import os
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
NO_MDWE = 75  # EX_TEMPFAIL: this kernel cannot apply the rule

_libc = ctypes.CDLL(None, use_errno=True)


def mdwe_supported():
    """Whether this kernel knows PR_SET_MDWE (Linux 6.3 and later)."""
    return _libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


def service_settings(unit_text):
    """The [Service] section's settings as {name: last value}."""
    settings, section = {}, None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            name, value = line.split("=", 1)
            settings[name.strip()] = value.strip()
    return settings


def restrictions(settings, force_mdwe=False):
    """The restrictions to apply: a subset of {"mdwe", "no_new_privs"}."""
    wanted = set()
    if force_mdwe or settings.get("MemoryDenyWriteExecute") == "yes":
        wanted.add("mdwe")
    if settings.get("NoNewPrivileges") == "yes":
        wanted.add("no_new_privs")
    return wanted


def _prctl(*args):
    if _libc.prctl(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), f"prctl{args}")


def main(argv):
    separator = argv.index("--")
    options, command = argv[:separator], argv[separator + 1 :]
    unit, force_mdwe = options[0], "--mdwe" in options[1:]
    with open(unit) as f:
        wanted = restrictions(service_settings(f.read()), force_mdwe)
    if "mdwe" in wanted:
        if not mdwe_supported():
            sys.stderr.write("this kernel has no PR_SET_MDWE (Linux 6.3 or later needed)\n")
            return NO_MDWE
        _prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
    if "no_new_privs" in wanted:
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    sys.stderr.write(f"unit_exec: applied {sorted(wanted)} from {unit}\n")
    sys.stderr.flush()
    os.execv(command[0], command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
