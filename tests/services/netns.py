"""A second "machine" for multi-host and partition tests: a network namespace and a veth pair.

:meth:`NetworkHost.create` makes namespace ``zwt-<pid>-<index>`` joined to this machine by a
veth pair: the host side gets ``10.213.<index>.1/30`` (:attr:`NetworkHost.service_address`,
where services listen besides 127.0.0.1, see the ``bind_hosts`` of the starters) and the
namespace side ``10.213.<index>.2``. The namespace has its own network stack and nothing
else: it shares the filesystem and, unless :meth:`NetworkHost.argv_in` sets one, the PIDs.
It has no default route, so nothing is routed beyond these links.

Several hosts each get their own link. To give them one "central host" address, bind the
services on the first host's ``service_address`` (and on the others', which PostgreSQL needs
to trust their subnets) and :meth:`NetworkHost.add_route` that address on the others: each
host's traffic then stays on its own link. :meth:`NetworkHost.tcp_peers` and
:meth:`NetworkHost.routes` show where a namespace's connections go and what it can reach.

:meth:`NetworkHost.partition` takes the host side of the link down: packets are dropped in
both directions and TCP connections stall, nothing is reset. A ``blackhole`` route
(``proto 213``) for the link's subnet, below the link's own route, keeps the host from
sending that traffic out of its default route meanwhile.

Needs root and ``ip`` (iproute2), ``unshare`` (util-linux) and ``hostname``. Names carry the
PID of the creating process, so parallel runs do not clash, and names of processes that are
gone (crashed runs) are removed by the next :meth:`NetworkHost.create`. Nothing here needs
pytest except the :func:`network_host_factory` fixture.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.services.process import (
    SETUP_HINT,
    ServiceError,
    ServiceUnavailableError,
    fixture,
    service_unavailable,
    wait_until,
)

__all__ = [
    "NetworkHost",
    "cleanup_stale_hosts",
    "network_host_factory",
    "network_unavailable_reason",
]

PREFIX = "zwt"
SUBNET = "10.213.{index}.0/30"
INDEXES = range(1, 255)
# Marks our blackhole routes, so a later run can tell them from anybody else's.
ROUTE_PROTO = "213"
BLACKHOLE_METRIC = "4000"
COMMAND_TIMEOUT_S = 10.0
HEAL_TIMEOUT_S = 5.0
_TOOLS = ("ip", "unshare", "hostname")
_NAMESPACE_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{PREFIX}(\d+)h(\d+)$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
# Runs "$@" with hostname "$1"; the values travel as arguments, never inside the script.
_SET_HOSTNAME = 'hostname "$1" && shift && exec "$@"'


class NetworkError(ServiceError):
    """An ``ip`` command that builds or changes a :class:`NetworkHost` failed."""


def network_unavailable_reason() -> str | None:
    """Return why network namespaces cannot be made here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "Network namespaces need root; run the fault tests as root (CI does)."
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(f'`{t}`' for t in missing)} not found on PATH; {SETUP_HINT}."
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip args...``.

    Raises:
        ServiceUnavailableError: when ``ip`` is missing or the kernel refuses (no privilege).
        NetworkError: when ``check`` and the command fails otherwise.
    """
    ip = shutil.which("ip")
    if ip is None:
        raise ServiceUnavailableError(f"`ip` (iproute2) was not found on PATH; {SETUP_HINT}.")
    done = subprocess.run(
        [ip, *args], capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_S
    )
    if check and done.returncode != 0:
        message = f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}"
        if "Operation not permitted" in done.stderr:
            raise ServiceUnavailableError(message)
        raise NetworkError(message)
    return done


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise index choice, creation and clean-up among the test processes of this machine."""
    path = Path(tempfile.gettempdir()) / f"{PREFIX}-netns.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _kill_namespace_processes(namespace: str) -> None:
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _subnet_in_use(subnet: str) -> bool:
    return bool(_ip("-o", "-4", "addr", "show", "to", subnet, check=False).stdout.strip())


def cleanup_stale_hosts() -> list[str]:
    """Delete namespaces, links and routes of earlier runs whose process is gone.

    Returns the names of what was deleted. Called by :meth:`NetworkHost.create`; a live
    process's hosts are never touched.
    """
    with _machine_lock():
        return _cleanup_stale_hosts()


def _cleanup_stale_hosts() -> list[str]:
    removed: list[str] = []
    for namespace in _namespaces():
        match = _NAMESPACE_RE.match(namespace)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_processes(namespace)
            _ip("netns", "del", namespace, check=False)
            removed.append(namespace)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0] if line.count(":") >= 2 else ""
        match = _LINK_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    routes = _ip("-4", "route", "show", "type", "blackhole", "proto", ROUTE_PROTO, check=False)
    for line in routes.stdout.splitlines():
        parts = line.split()
        subnet = next((p for p in parts if "/" in p), None)
        if subnet is not None and not _subnet_in_use(subnet):
            _ip("route", "del", "blackhole", subnet, "metric", BLACKHOLE_METRIC, check=False)
            removed.append(f"blackhole {subnet}")
    return removed


@dataclass
class NetworkHost:
    """A worker "VM": a network namespace joined to this machine by its own veth pair.

    Attributes:
        index: Its number, the third octet of its addresses (1-254).
        namespace: Name of the network namespace (``zwt-<pid>-<index>``).
        host_interface: The veth end on this machine (``zwt<pid>h<index>``).
        namespace_interface: The veth end inside the namespace (``zwt<pid>n<index>``).
        service_address: ``10.213.<index>.1``, this machine's address on the link: bind
            services here and point the namespace's clients at it.
        address: ``10.213.<index>.2``, the namespace's address.
        hostname: Default UTS hostname for :meth:`argv_in`.
    """

    index: int
    namespace: str
    host_interface: str
    namespace_interface: str
    service_address: str
    address: str
    hostname: str
    prefix_len: int = 30
    partitioned: bool = field(default=False, init=False)
    destroyed: bool = field(default=False, init=False)
    _routes: list[str] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def create(cls, index: int | None = None, *, hostname: str | None = None) -> NetworkHost:
        """Make namespace, veth pair and addresses for host ``index``; returns it up and linked.

        Stale hosts of crashed runs are removed first. Destroy it with :meth:`destroy` (or use
        the :func:`network_host_factory` fixture).

        Args:
            index: third octet of its addresses, 1-254; the lowest free one when None.
            hostname: default hostname for :meth:`argv_in` (``host<index>`` when None).

        Raises:
            ServiceUnavailableError: not root, ``ip`` missing or the kernel refuses.
            NetworkError: the subnet is in use already, or an ``ip`` command failed.
            ValueError: ``index`` out of range or ``hostname`` not a valid host name.
        """
        if index is not None and index not in INDEXES:
            raise ValueError(f"index must be in 1-254, not {index}.")
        with _machine_lock():
            _cleanup_stale_hosts()
            if index is None:
                index = next(
                    (i for i in INDEXES if not _subnet_in_use(SUBNET.format(index=i))), None
                )
                if index is None:
                    raise NetworkError("Every 10.213.<index>.0/30 subnet is in use.")
            elif _subnet_in_use(SUBNET.format(index=index)):
                shown = _ip("-o", "-4", "addr", "show", "to", SUBNET.format(index=index))
                raise NetworkError(
                    f"{SUBNET.format(index=index)} is in use already:\n{shown.stdout.strip()}"
                )
            pid = os.getpid()
            host = cls(
                index=index,
                namespace=f"{PREFIX}-{pid}-{index}",
                host_interface=f"{PREFIX}{pid}h{index}",
                namespace_interface=f"{PREFIX}{pid}n{index}",
                service_address=f"10.213.{index}.1",
                address=f"10.213.{index}.2",
                hostname=_check_hostname(hostname or f"host{index}"),
            )
            try:
                host._build()
            except BaseException:
                host._teardown()
                raise
        return host

    @property
    def subnet(self) -> str:
        """The link's subnet, ``10.213.<index>.0/30``."""
        return str(ipaddress.ip_interface(f"{self.service_address}/{self.prefix_len}").network)

    def argv_in(self, argv: Sequence[str], hostname: str | None = None) -> list[str]:
        """Return ``argv`` wrapped to run inside the namespace with its own UTS hostname.

        The wrappers (``ip netns exec``, ``unshare --uts``, ``sh``) each ``exec`` the next, so
        the PID and process group of the started process are those of ``argv[0]``: a
        :class:`~tests.services.process.ServiceProcess` stops it as any other.

        Raises:
            ValueError: when ``hostname`` is not a valid host name.
        """
        name = _check_hostname(hostname or self.hostname)
        return [
            _tool("ip"), "netns", "exec", self.namespace,
            _tool("unshare"), "--uts",
            "sh", "-c", _SET_HOSTNAME, "zw-netns", name,
            *argv,
        ]  # fmt: skip

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float = COMMAND_TIMEOUT_S,
        hostname: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace and return its result (text output, unchecked).

        Raises:
            subprocess.TimeoutExpired: when it runs longer than ``timeout_s`` seconds.
        """
        return subprocess.run(
            self.argv_in(argv, hostname),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )

    def add_route(self, address: str) -> None:
        """Route ``address`` from the namespace through this link to this machine.

        For an address of this machine on another link, e.g. another host's
        ``service_address`` where a single-address service (SeaweedFS) listens. It goes
        down with this host's :meth:`partition` only, and :meth:`heal` restores it.

        Raises:
            NetworkError: when ``ip route`` fails.
        """
        route = f"{ipaddress.ip_address(address)}/32"
        _ip("-n", self.namespace, "route", "replace", route, "via", self.service_address)
        if route not in self._routes:
            self._routes.append(route)

    def partition(self) -> None:
        """Cut the link (host side down): packets drop both ways, TCP stalls, nothing resets.

        Connection attempts from the namespace time out; established connections hang until
        their own timeouts fire. This machine still reaches ``service_address`` itself.

        Raises:
            NetworkError: when ``ip link`` fails.
        """
        self._require_alive()
        _ip("link", "set", self.host_interface, "down")
        self.partitioned = True

    def heal(self, timeout_s: float = HEAL_TIMEOUT_S) -> None:
        """Bring the link up again and wait until both ends are up and routed.

        Addresses and routes are set again in case the kernel dropped them while it was down.

        Raises:
            NetworkError: when an ``ip`` command fails.
            TimeoutError: when the link is not up within ``timeout_s`` seconds.
        """
        self._require_alive()
        _ip("link", "set", self.host_interface, "up")
        self._configure()
        wait_until(
            self._link_is_up, timeout_s, f"the link of {self.namespace} to come up after heal()"
        )
        self.partitioned = False

    def exists(self) -> bool:
        """Return True while its namespace exists."""
        return self.namespace in _namespaces()

    def routes(self) -> list[str]:
        """The namespace's IPv4 routes, one ``ip route`` line each.

        Raises:
            NetworkError: when ``ip route`` fails (the namespace is gone).
        """
        shown = _ip("-n", self.namespace, "-4", "route", "show")
        return [line.strip() for line in shown.stdout.splitlines() if line.strip()]

    def tcp_peers(self) -> set[str]:
        """Remote addresses of the namespace's established TCP connections (``ss``).

        Raises:
            NetworkError: when ``ss`` fails inside the namespace.
        """
        shown = _ip(
            "netns", "exec", self.namespace, _tool("ss"), "-H", "-t", "-n", "state", "established"
        )
        peers = set()
        for line in shown.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 4:  # Recv-Q Send-Q Local:Port Peer:Port
                peers.add(fields[3].rsplit(":", 1)[0].strip("[]"))
        return peers

    def destroy(self) -> None:
        """Kill what still runs in the namespace, delete the veth pair, route and namespace.

        Idempotent; safe on a partly created host.
        """
        if self.destroyed:
            return
        with _machine_lock():
            self._teardown()

    def _build(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip(
            "link", "add", self.host_interface, "type", "veth",
            "peer", "name", self.namespace_interface, "netns", self.namespace,
        )  # fmt: skip
        _ip("link", "set", self.host_interface, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")
        _ip("-n", self.namespace, "link", "set", self.namespace_interface, "up")
        _ip(
            "route", "replace", "blackhole", self.subnet,
            "metric", BLACKHOLE_METRIC, "proto", ROUTE_PROTO,
        )  # fmt: skip
        self._configure()
        wait_until(self._link_is_up, HEAL_TIMEOUT_S, f"the link of {self.namespace} to come up")

    def _configure(self) -> None:
        """Set addresses and routes (idempotent: ``replace``)."""
        ns = ("-n", self.namespace)
        host_cidr = f"{self.service_address}/{self.prefix_len}"
        _ip("addr", "replace", host_cidr, "dev", self.host_interface)
        _ip(
            *ns,
            "addr",
            "replace",
            f"{self.address}/{self.prefix_len}",
            "dev",
            self.namespace_interface,
        )
        for route in self._routes:
            _ip(*ns, "route", "replace", route, "via", self.service_address)

    def _link_is_up(self) -> bool:
        host_side = _ip("-o", "link", "show", "dev", self.host_interface).stdout
        ns_side = _ip("-n", self.namespace, "-o", "link", "show", "dev", self.namespace_interface)
        routed = _ip("-4", "route", "show", self.subnet, "dev", self.host_interface).stdout
        return "state UP" in host_side and "state UP" in ns_side.stdout and bool(routed.strip())

    def _teardown(self) -> None:
        _kill_namespace_processes(self.namespace)
        _ip("link", "del", self.host_interface, check=False)
        _ip("netns", "del", self.namespace, check=False)
        _ip("route", "del", "blackhole", self.subnet, "metric", BLACKHOLE_METRIC, check=False)
        self.destroyed = True

    def _require_alive(self) -> None:
        if self.destroyed:
            raise NetworkError(f"{self.namespace} was destroyed.")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceUnavailableError(f"`{name}` was not found on PATH; {SETUP_HINT}.")
    return found


def _check_hostname(name: str) -> str:
    if not _HOSTNAME_RE.match(name):
        raise ValueError(f"{name!r} is not a host name (letters, digits, '.', '-'; max 63).")
    return name


@fixture()
def network_host_factory() -> Iterator[Callable[..., NetworkHost]]:
    """Factory with :meth:`NetworkHost.create`'s signature; destroys every host at teardown.

    Request it before the fixtures that start processes inside the hosts, so they stop
    first (:meth:`NetworkHost.destroy` kills leftovers anyway). Fails in CI and skips
    elsewhere when not root or ``ip``/``unshare``/``hostname`` is missing.
    """
    reason = network_unavailable_reason()
    if reason is not None:
        service_unavailable(reason)
    hosts: list[NetworkHost] = []

    def create(index: int | None = None, *, hostname: str | None = None) -> NetworkHost:
        try:
            host = NetworkHost.create(index, hostname=hostname)
        except ServiceUnavailableError as e:
            service_unavailable(str(e))
        hosts.append(host)
        return host

    yield create
    for host in reversed(hosts):
        host.destroy()
