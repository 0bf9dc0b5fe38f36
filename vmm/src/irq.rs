//! KVM GSI routing: the default PIC/IOAPIC routes plus MSI routes for MSI-X vectors.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// First GSI handed out for MSI vectors (0..23 are the IOAPIC pins).
pub const MSI_GSI_BASE: u32 = 24;

/// Routing table shared by every device that programs MSI-X vectors.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    inner: Mutex<RoutingInner>,
}

struct RoutingInner {
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouting {
            vm,
            inner: Mutex::new(RoutingInner {
                msi: BTreeMap::new(),
                next_gsi: MSI_GSI_BASE,
            }),
        }
    }

    /// Reserve a GSI for an MSI vector.
    pub fn allocate_gsi(&self) -> u32 {
        let mut i = self.inner.lock().unwrap();
        let g = i.next_gsi;
        i.next_gsi += 1;
        g
    }

    /// Point `gsi` at MSI `address`/`data` (or remove it with `None`) and push the table.
    pub fn set_msi(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), String> {
        let mut i = self.inner.lock().unwrap();
        let changed = match msg {
            Some(m) => i.msi.insert(gsi, m) != Some(m),
            None => i.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&i)?;
        }
        Ok(())
    }

    /// Install the default routes (call once after KVM_CREATE_IRQCHIP).
    pub fn init(&self) -> Result<(), String> {
        let i = self.inner.lock().unwrap();
        self.commit(&i)
    }

    fn commit(&self, i: &RoutingInner) -> Result<(), String> {
        let mut entries = Vec::new();
        for gsi in 0..24u32 {
            if gsi < 16 {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                e.u.irqchip.irqchip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                e.u.irqchip.pin = gsi % 8;
                entries.push(e);
            }
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            entries.push(e);
        }
        for (&gsi, &(addr, data)) in &i.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let mut table =
            KvmIrqRouting::new(entries.len()).map_err(|e| format!("GSI routing table: {e:?}"))?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }
}
