"""A store network of the test's own: a network namespace for the proxy, joined to this one by two
links, the terminals' link and the database link, each a pair of veths bridged in a third namespace
that plays the wide-area network in between, where nftables rules make a link lossy, partitioned
or dead (this machine's kernel has no netem; tests/integration/relay.py adds delay).

The rules sit in netdev ingress chains on the bridge's two ports, so a dropped packet is lost on
the wire as far as either TCP stack can tell: a drop on a sending host's own way out (an egress or
output hook) is reported to its TCP as local congestion, and keepalive probes so dropped are never
counted. They match only the one TCP port a link carries for the test (the proxy's listener, the
database relay), so the proxy's admin API stays reachable through a partition and the test can
watch the proxy recover. Inside the proxy's namespace ``localhost`` resolves to this end of the
database link (iproute2 bind-mounts /etc/netns/NAME/hosts over /etc/hosts), so a route to
``localhost`` verifies the database's certificate as usual. Deleting the namespaces takes the
veths, bridges, rules and hosts file with them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import pytest

_PREFIX = "posproxy"
_instances = count()
_IP_NETNS_ETC = Path("/etc/netns")
# Two /30 subnets per store network, one per link, picked by pid and instance from a /16 that
# nothing else here routes, so that concurrent runs on one machine do not clash.
_SUBNETS = ipaddress.ip_network("10.213.0.0/16")
_RULES = "pos_proxy_links"


def require_namespaces() -> tuple[str, str]:
    """The ip and nft binaries, or a skip without root (network namespaces need it), or a failure
    as root: there nothing excuses their absence."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and nftables rules need root")
    ip, nft = shutil.which("ip"), shutil.which("nft")
    if ip is None or nft is None:
        missing = " and ".join(name for name, path in (("ip", ip), ("nft", nft)) if path is None)
        pytest.fail(
            f"{missing} not installed (scripts/setup-test-env.sh installs iproute2 and nftables);"
            " as root a missing tool is an error, not a skip"
        )
    return ip, nft


@dataclass(frozen=True, slots=True)
class Link:
    """One link: ``here`` is this namespace's address on it, ``there`` the proxy's; ``device`` names
    the proxy's end (and, with suffixes, the veths and bridge of the link)."""

    name: str
    device: str
    here: str
    there: str

    @property
    def from_here(self) -> str:
        """The bridge port where packets from this namespace enter the wide-area network."""
        return f"{self.device}w1"

    @property
    def from_there(self) -> str:
        """The bridge port where packets from the proxy's namespace enter it."""
        return f"{self.device}w2"


class StoreNetwork:
    """The proxy's namespace, the wide-area one, and the two links; faults act per link and port."""

    def __init__(self, ip: str, nft: str) -> None:
        self._ip, self._nft = ip, nft
        instance = next(_instances)
        pid = os.getpid()
        self.namespace = f"{_PREFIX}-{pid}-{instance}"
        self.wan_namespace = f"{self.namespace}-wan"
        slot = (pid * 4 + instance) % (_SUBNETS.num_addresses // 8)
        terminal_net, database_net = ipaddress.ip_network(
            f"{_SUBNETS.network_address + slot * 8}/29"
        ).subnets(new_prefix=30)
        # Interface names have at most 15 characters; the ones in this namespace must be unique.
        tag = f"{pid % 1_000_000}{instance % 100}"
        self.terminal_link = self._link("terminal", f"pt{tag}", terminal_net)
        self.database_link = self._link("database", f"pd{tag}", database_net)
        self._hosts_dir = _IP_NETNS_ETC / self.namespace

    @staticmethod
    def _link(name: str, device: str, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Link:
        first, second = list(subnet.hosts())
        return Link(name, device, str(first), str(second))

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside the proxy's namespace."""
        return [self._ip, "netns", "exec", self.namespace]

    def _run(self, *command: str, stdin: str | None = None) -> None:
        subprocess.run(command, input=stdin, text=True, check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        self._delete_namespaces_of_dead_runs()
        ip, store, wan = self._ip, self.namespace, self.wan_namespace
        for namespace in (store, wan):
            self._run(ip, "netns", "add", namespace)
            self._run(ip, "-n", namespace, "link", "set", "lo", "up")
        for link in (self.terminal_link, self.database_link):
            here, bridge = f"{link.device}h", f"{link.device}b"
            self._run(ip, "link", "add", here, "type", "veth", "peer", "name", link.from_here, "netns", wan)
            self._run(
                ip, "-n", wan, "link", "add", link.from_there, "type", "veth", "peer", "name", link.device,
                "netns", store,
            )  # fmt: skip
            self._run(ip, "-n", wan, "link", "add", bridge, "type", "bridge")
            for port in (link.from_here, link.from_there):
                self._run(ip, "-n", wan, "link", "set", port, "master", bridge, "up")
            self._run(ip, "-n", wan, "link", "set", bridge, "up")
            self._run(ip, "address", "add", f"{link.here}/30", "dev", here)
            self._run(ip, "link", "set", here, "up")
            self._run(ip, "-n", store, "address", "add", f"{link.there}/30", "dev", link.device)
            self._run(ip, "-n", store, "link", "set", link.device, "up")
        self._hosts_dir.mkdir(parents=True, exist_ok=True)
        (self._hosts_dir / "hosts").write_text(f"{self.database_link.here} localhost\n", encoding="ascii")
        chains = "".join(
            f'  chain {port} {{ type filter hook ingress device "{port}" priority 0; policy accept; }}\n'
            for link in (self.terminal_link, self.database_link)
            for port in (link.from_here, link.from_there)
        )
        self._nft_script(f"table netdev {_RULES} {{\n{chains}}}\n")

    def _nft_script(self, script: str) -> None:
        self._run(self._ip, "netns", "exec", self.wan_namespace, self._nft, "-f", "-", stdin=script)

    def _delete_namespaces_of_dead_runs(self) -> None:
        """A run killed before its teardown leaves its namespaces (and so its veths) behind."""
        listed = subprocess.run(
            [self._ip, "netns", "list"], check=True, capture_output=True, text=True, timeout=10
        ).stdout
        for match in re.finditer(rf"^({_PREFIX}-(\d+)-\d+(?:-wan)?)\b", listed, re.MULTILINE):
            if not Path(f"/proc/{match.group(2)}").exists():
                self._delete_namespace(match.group(1))

    def _delete_namespace(self, namespace: str) -> None:
        subprocess.run([self._ip, "netns", "delete", namespace], check=False, capture_output=True, timeout=10)
        shutil.rmtree(_IP_NETNS_ETC / namespace, ignore_errors=True)

    def delete(self) -> None:
        self._delete_namespace(self.namespace)
        self._delete_namespace(self.wan_namespace)

    def _act(self, link: Link, port: int, verdict: str) -> None:
        """Apply ``verdict`` (an nft statement) to the link's packets to or from ``port``, both ways."""
        rules = "".join(
            f"add rule netdev {_RULES} {bridge_port} tcp {end} {port} {verdict}\n"
            for bridge_port in (link.from_here, link.from_there)
            for end in ("sport", "dport")
        )
        self._nft_script(rules)

    def lose(self, link: Link, port: int, percent: int) -> None:
        """Drop about ``percent`` % of the packets each way, each packet on its own throw."""
        self._act(link, port, f"numgen random mod 100 < {percent} counter drop")

    def cut(self, link: Link, port: int) -> None:
        """Drop every packet each way: a partition, or a link gone dead, until mended."""
        self._act(link, port, "counter drop")

    def dropped(self, link: Link) -> int:
        """Packets the link's rules have dropped since they were added."""
        listed = subprocess.run(
            [self._ip, "netns", "exec", self.wan_namespace, self._nft, "list", "table", "netdev", _RULES],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        total = 0
        for chain in re.finditer(r"chain (\S+) \{(.*?)\n\t\}", listed, re.DOTALL):
            if chain.group(1) in (link.from_here, link.from_there):
                total += sum(int(n) for n in re.findall(r"counter packets (\d+)", chain.group(2)))
        return total

    def mend(self, link: Link) -> None:
        self._nft_script(
            "".join(f"flush chain netdev {_RULES} {port}\n" for port in (link.from_here, link.from_there))
        )


@contextmanager
def store_network() -> Iterator[StoreNetwork]:
    network = StoreNetwork(*require_namespaces())
    try:
        network.create()
        yield network
    finally:
        network.delete()
