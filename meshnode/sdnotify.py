"""systemd's service notification protocol (``Type=notify``, ``WatchdogSec=``).

systemd passes a datagram socket in ``NOTIFY_SOCKET`` and, with a watchdog,
its period in ``WATCHDOG_USEC``; the service sends ``READY=1`` once it is up,
``WATCHDOG=1`` more often than the period, ``STATUS=...`` for
``systemctl status``, and ``STOPPING=1`` as it shuts down (sd_notify(3)).
The protocol is one ``sendto`` of ``KEY=VALUE`` lines; the bindings that
exist (systemd-python) need libsystemd's headers to build, so these thirty
lines are ours.

The variables are taken out of the environment when read, as
``sd_notify(unset_environment=1)`` does: the engines this node starts must
not talk to systemd in its name.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

__all__ = ["Notifier"]

log = logging.getLogger("meshnode.systemd")

MESSAGE_MAX = 4096  # a notification is a few short lines; STATUS is cut to fit


class Notifier:
    """Where to tell systemd how the service is; every call is a no-op without systemd."""

    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._failed = False

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec = env.pop("WATCHDOG_USEC", None)
        pid = env.pop("WATCHDOG_PID", None)
        watchdog_s = None
        if usec is not None and (pid is None or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog", usec[:40])
        if address is not None and not (address.startswith("/") or address.startswith("@")):
            log.warning("NOTIFY_SOCKET is neither a path nor an abstract socket: not notifying systemd")
            address = None
        return cls(address, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=VALUE`` lines (``ready="1"`` is ``READY=1``); whether systemd got them."""
        if self.address is None:
            return False
        text = "\n".join(f"{k.upper()}={v.replace(chr(10), ' ')}" for k, v in fields.items())
        data = text.encode("utf-8", "replace")[:MESSAGE_MAX]
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.setblocking(False)
                s.sendto(data, target)
        except OSError as e:
            if not self._failed:  # one line, not one a watchdog period
                log.warning("cannot notify systemd at %s: %s", self.address, e.strerror or e)
                self._failed = True
            return False
        return True
