"""Per-VM statistics in the Prometheus text format (issue 20, in progress: not
served by hostd yet). A custom collector yields the latest sample of each VM at
scrape time, so nothing is kept twice and a VM that is gone leaves no stale series."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
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
