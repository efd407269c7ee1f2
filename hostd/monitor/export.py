"""Per-VM statistics in the Prometheus text format, served by hostd on a
loopback port (`sfmpi hostd --metrics-port`, SFMPI_METRICS_PORT) and printed by
`sfmpi stats metrics`. A custom collector yields the latest sample of each VM
at scrape time, so nothing is kept twice and a VM that is gone leaves no stale series."""
from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from sfmpi.errors import UsageError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = {"disk_read_bytes": "Bytes the VM read from its disks",
            "disk_write_bytes": "Bytes the VM wrote to its disks",
            "net_rx_bytes": "Bytes the VM received on its tap", "net_tx_bytes": "Bytes the VM sent on its tap"}


class VmCollector:
    def __init__(self, latest: Callable[[], list[dict]]):
        self.latest = latest

    def collect(self):
        samples = self.latest()
        cpu = GaugeMetricFamily("sfmpi_vm_cpu_percent", "CPU of the VM's QEMU, percent of one host core",
                                labels=["vm"])
        vcpu = GaugeMetricFamily("sfmpi_vm_vcpu_percent", "CPU of one vCPU thread, percent of one host core",
                                 labels=["vm", "vcpu"])
        pss = GaugeMetricFamily("sfmpi_vm_mem_pss_bytes", "Proportional set size of the VM's QEMU", labels=["vm"])
        counters = {k: CounterMetricFamily(f"sfmpi_vm_{k}", text, labels=["vm"]) for k, text in COUNTERS.items()}
        for s in samples:
            cpu.add_metric([s["vm"]], s["cpu_percent"])
            for index, value in enumerate(s["vcpu_percent"]):
                vcpu.add_metric([s["vm"], str(index)], value)
            pss.add_metric([s["vm"]], s["mem_pss_bytes"])
            for key, family in counters.items():
                family.add_metric([s["vm"]], s[key])
        yield from (cpu, vcpu, pss, *counters.values())


def exposition(latest: Callable[[], list[dict]]) -> bytes:
    registry = CollectorRegistry()
    registry.register(VmCollector(latest))
    return generate_latest(registry)


def metrics_port_from_env() -> int | None:
    """SFMPI_METRICS_PORT: the loopback port for Prometheus (unset or 0: none)."""
    text = os.environ.get("SFMPI_METRICS_PORT", "").strip()
    if not text:
        return None
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise UsageError(f"SFMPI_METRICS_PORT must be a port 1-65535, or 0 for none (got {text!r})")
    return int(text) or None


class MetricsServer:
    """prometheus_client's HTTP server on 127.0.0.1:port. Lifecycle: start() -> close()."""

    def __init__(self, port: int, latest: Callable[[], list[dict]]):
        self.port = port
        self.registry = CollectorRegistry()
        self.registry.register(VmCollector(latest))
        self._httpd = None

    def start(self) -> "MetricsServer":
        try:
            self._httpd, _thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise UsageError(f"metrics port 127.0.0.1:{self.port}: {exc.strerror}") from None
        self.port = self._httpd.server_port
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
