"""The network through the Python binding, on the freestanding test guest (no network driver:
nothing in it talks on the network or listens): configuration, ports published on 127.0.0.1,
connect_tcp (the stream ends since no guest answers), policy changes, stats, fork children with
networks of their own, and readable errors. Only 127.0.0.1 is ever dialled."""

import socket

import pytest

import forkvm

from conftest import generation_lines, wait_until


def accepts(port: int) -> bool:
    """Whether a TCP connect to 127.0.0.1:port succeeds."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def network() -> forkvm.Network:
    return forkvm.Network(
        publish={0: 80, ("127.0.0.1", 0): 81},
        allow=["127.0.0.1/32"],
        deny=["10.0.0.0/8"],
        allow_domains=["example.com"],
        deny_all=True,
        hosts={"db.internal": ["10.0.2.2"]},
        loopback_only=True,
    )


def test_publish_connect_tcp_policy_and_stats(guest: str) -> None:
    console = forkvm.ConsoleBuffer()
    with forkvm.VM(guest, memory_mib=32, cmdline="mode=generation", console=console, network=network()) as vm:
        wait_until("generation 0", lambda: len(generation_lines(console)) == 1)
        assert [d.device_type for d in vm.devices].count(1) == 1  # virtio-net

        host, port = vm.publish(8080)
        assert host == "127.0.0.1" and port != 0
        assert accepts(port)
        with pytest.raises(forkvm.HostIoError, match="cannot publish"):
            vm.publish(8080, port=port)
        vm.unpublish(port)
        with pytest.raises(forkvm.HostIoError, match="not published"):
            vm.unpublish(port)
        wait_until("the port to close", lambda: not accepts(port))

        stats = vm.network_stats()
        assert not stats["down"] and stats["denied_total"] == 0
        assert set(stats["dns"]) >= {"queries", "answered"}
        before = stats["tcp_flows_total"]
        with vm.connect_tcp(80) as stream:
            assert stream.type == socket.SOCK_STREAM
            wait_until("the flow", lambda: vm.network_stats()["tcp_flows_total"] == before + 1)
            stream.settimeout(20)
            try:
                assert stream.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_until("the flow to close", lambda: vm.network_stats()["tcp_flows_open"] == 0)

        vm.set_network_policy(allow=["127.0.0.1/32"], allow_domains=["example.org"])
        vm.set_network_policy(allow=["127.0.0.1 tcp/8000-8999"], deny=["10.0.0.0/8 udp/53"])
        with pytest.raises(forkvm.InvalidArgumentError, match="tcp/99999"):
            vm.set_network_policy(allow=["127.0.0.1 tcp/99999"])
        vm.set_network_policy(deny_all=True)
        with pytest.raises(forkvm.InvalidArgumentError, match="10.0.0.0/33"):
            vm.set_network_policy(allow=["10.0.0.0/33"])

        # Fork: one child with a network of its own, one with the parent's policy.
        children = vm.fork([forkvm.Child(network=forkvm.Network(deny_all=True, loopback_only=True)), None])
        for child in children:
            assert child.network_stats()["tcp_flows_total"] == 0
            _, child_port = child.publish(80)
            assert accepts(child_port)
            child.close()


def test_bad_configuration_and_no_network(guest: str) -> None:
    with pytest.raises(forkvm.InvalidArgumentError, match="not a cidr"):
        forkvm.Network(allow=["not a cidr"])
    with pytest.raises(forkvm.InvalidArgumentError, match="domain"):
        forkvm.Network(allow_domains=["*.example.com"])
    with pytest.raises(forkvm.InvalidArgumentError, match="not an IP address"):
        forkvm.Network(publish={("localhost", 0): 80})
    with pytest.raises(forkvm.InvalidArgumentError, match="not an IP address"):
        forkvm.Network(hosts={"db": ["10.0.2"]})
    with pytest.raises(TypeError):
        forkvm.Network(publish={"8080": 80})  # type: ignore[dict-item]

    with forkvm.VM(guest, memory_mib=32, console=None) as vm:
        with pytest.raises(forkvm.NoDeviceError, match="no network"):
            vm.connect_tcp(80)
        with pytest.raises(forkvm.NoDeviceError):
            vm.network_stats()
        with pytest.raises(forkvm.NoDeviceError):
            vm.publish(80)
        assert [d.device_type for d in vm.devices].count(1) == 0


def test_a_published_port_is_bound_at_build(guest: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        taken = probe.getsockname()[1]
        probe.listen()
        with pytest.raises(forkvm.HostIoError, match=f"127.0.0.1:{taken}"):
            forkvm.VM(
                guest,
                memory_mib=32,
                console=None,
                network=forkvm.Network(publish={taken: 80}, loopback_only=True),
            )
