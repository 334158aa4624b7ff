"""Network changes from the kernel (rtnetlink): ask again at once when the kiosk's network comes back.

A kiosk that lost its network (Wi-Fi dropped, a cable pulled, the DHCP lease gone) hears from the kernel when
it returns: an interface up and running, an address or a route added. Waiting out the offline probe's backoff
(up to ``session.probe_max_seconds``) instead would leave a visitor in front of an offline kiosk for seconds
after the network was back (the field bench: 8 s after a 120 s outage), and a stored message waiting as long
for delivery. ``NetworkWatch.sleep`` is the probe's sleep: it returns early, and says so, on such a change.
Outages beyond the kiosk (the venue's uplink, the API itself) show no change here; the backoff covers those.

Only "something came up" counts (``RTM_NEWLINK`` of an interface that is up and running, ``RTM_NEWADDR``,
``RTM_NEWROUTE``); links going down do not wake anyone. A kernel that refuses the socket (no netlink in a
sandbox) leaves the probe on its backoff, with a warning.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct

_LOGGER = logging.getLogger(__name__)

# rtnetlink multicast groups (linux/rtnetlink.h): links, IPv4 and IPv6 addresses and routes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

RTM_NEWLINK = 16
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFF_UP = 0x1
IFF_RUNNING = 0x40
_UP_AND_RUNNING = IFF_UP | IFF_RUNNING

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), device type, index, flags, change


def comings_up(datagram: bytes) -> int:
    """How many messages in one rtnetlink datagram say something came up (malformed parts end the count)."""
    count = 0
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size or offset + length > len(datagram):
            break
        body = offset + _NLMSGHDR.size
        if kind == RTM_NEWLINK:
            if length >= _NLMSGHDR.size + _IFINFOMSG.size:
                flags = _IFINFOMSG.unpack_from(datagram, body)[3]
                count += (flags & _UP_AND_RUNNING) == _UP_AND_RUNNING
        elif kind in (RTM_NEWADDR, RTM_NEWROUTE):
            count += 1
        offset += (length + 3) & ~3  # messages are 4-byte aligned
    return count


class NetworkWatch:
    """The kernel's news of the kiosk's network coming up, for the offline probe and the message delivery."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self.changes = 0  # messages that said something came up, since start

    def start(self) -> bool:
        """Subscribe to the kernel's link, address and route news; False (and a warning) where it refuses."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except OSError as error:
            _LOGGER.warning("no news of network changes from the kernel (%s): the offline probe keeps to its "
                            "backoff", error)
            return False
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)
        self._socket = sock
        return True

    def close(self) -> None:
        """Unsubscribe (safe to call twice)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _read(self) -> None:
        assert self._socket is not None
        came_up = 0
        while True:
            try:
                datagram = self._socket.recv(65536)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    came_up += 1  # the kernel dropped news (a burst of changes): something did change
                    continue
                raise
            if not datagram:
                break
            came_up += comings_up(datagram)
        if came_up:
            self.changes += came_up
            _LOGGER.debug("the network changed (%d)", came_up)
            waiters, self._waiters = self._waiters, set()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait(self) -> None:
        """Return at the next news of the network coming up."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    async def sleep(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the network comes up meanwhile; True if it did."""
        try:
            await asyncio.wait_for(self.wait(), seconds)
        except TimeoutError:
            return False
        return True
