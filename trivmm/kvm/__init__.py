"""Python bindings for the Linux KVM API: ``Kvm`` -> ``Vm`` -> ``Vcpu``, each owning its fd."""

from trivmm.kvm._ioctl import KvmError, KvmUnavailable, MissingCapability
from trivmm.kvm.constants import Cap, ExitReason
from trivmm.kvm.system import CpuidEntry, Kvm
from trivmm.kvm.vcpu import Vcpu
from trivmm.kvm.vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu", "CpuidEntry", "KvmError", "KvmUnavailable",
           "MissingCapability", "Cap", "ExitReason"]  # fmt: skip
