"""Families.leave_soon: VMs stopped together leave their family's network in one batch.

The family's network is a recorder here (the real FamilyNetwork, with bridges,
taps and nft, is exercised by tests/integration/test_network_rules.py); what is
tested is the order and batching of the work on the families' worker thread."""
from __future__ import annotations

import asyncio
import threading

from sfmpi.hostd.net.families import Families, Family


class RecordingNet:
    nat = False
    open_ports = ()

    def __init__(self):
        self.removed: list[list[int]] = []
        self.downs = 0

    def remove_vms(self, ks):
        self.removed.append(list(ks))

    def down(self):
        self.downs += 1


def test_vms_stopped_together_leave_in_one_batch_and_the_empty_family_goes(tmp_path):
    fams = Families(tmp_path)
    net = RecordingNet()
    fams.by_name["p"] = Family(name="p", number=3, net=net, members={"p": 0, "p-1": 1, "p-2": 2, "p-3": 3})
    gate = threading.Event()
    fams._worker.submit(gate.wait)  # the worker is busy, as with a clone request's network work
    for vm in ("p-1", "p-2", "p-3"):
        fams.leave_soon(vm)
    gate.set()
    asyncio.run(fams.in_namespace(lambda: None))  # the batch is done
    fams.leave_soon("p")
    asyncio.run(fams.in_namespace(lambda: None))
    assert net.removed == [[1, 2, 3], [0]]
    assert net.downs == 1 and "p" not in fams.by_name


def test_a_leaving_id_is_not_handed_out_before_its_network_is_gone(tmp_path):
    fams = Families(tmp_path)
    net = RecordingNet()
    fam = Family(name="p", number=3, net=net, members={"p": 0, "p-1": 1})
    fams.by_name["p"] = fam
    gate = threading.Event()
    fams._worker.submit(gate.wait)
    fams.leave_soon("p-1")
    assert fams.free_ids(fam, 1) == [2]
    gate.set()
    fams._worker.submit(lambda: None).result()
    assert net.removed == [[1]] and fams.free_ids(fam, 1) == [1]
