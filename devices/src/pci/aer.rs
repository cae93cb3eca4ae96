//! Advanced Error Reporting as signalling (PCIe Base Spec r6.0 §6.2): a function logs an error
//! in its AER capability and sends ERR_COR / ERR_NONFATAL / ERR_FATAL upstream; the Root Port
//! records the message in its root error registers and interrupts — what Linux's AER service
//! driver (drivers/pci/pcie/aer.c `aer_isr`) reads before calling the source driver's error
//! handlers (`cor_error_detected`, `error_detected`).
//!
//! The registers live in the functions' config spaces ([`super::capability::aer_capability`]);
//! this module is the logic the VMM runs when it injects an error.

use super::capability::aer;
use super::config::{COMMAND, COMMAND_SERR, ConfigSpace};
use super::pcie::{DEVCTL, DEVSTA};

/// Uncorrectable Internal Error (AER Uncorrectable Error Status bit 22): how a CXL device in a
/// VH topology conveys an uncorrectable CXL.cachemem error (CXL 2.0 §12.2.2).
pub const UNCOR_INTERNAL: u32 = 1 << 22;
/// Corrected Internal Error (AER Correctable Error Status bit 14): a corrected CXL.cachemem
/// error (CXL 2.0 §12.2.2).
pub const COR_INTERNAL: u32 = 1 << 14;

/// Device Control: Correctable / Non-Fatal / Fatal Error Reporting Enable.
const DEVCTL_CERE: u16 = 1 << 0;
const DEVCTL_NFERE: u16 = 1 << 1;
const DEVCTL_FERE: u16 = 1 << 2;
/// Device Status: Correctable / Non-Fatal / Fatal Error Detected.
const DEVSTA_CED: u16 = 1 << 0;
const DEVSTA_NFED: u16 = 1 << 1;
const DEVSTA_FED: u16 = 1 << 2;

/// Root Error Status bits (§7.8.4.10).
pub mod root_status {
    /// ERR_COR Received.
    pub const COR: u32 = 1 << 0;
    /// Multiple ERR_COR Received.
    pub const MULTI_COR: u32 = 1 << 1;
    /// ERR_FATAL/NONFATAL Received.
    pub const UNCOR: u32 = 1 << 2;
    /// Multiple ERR_FATAL/NONFATAL Received.
    pub const MULTI_UNCOR: u32 = 1 << 3;
    /// First Uncorrectable Fatal.
    pub const FIRST_FATAL: u32 = 1 << 4;
    /// Non-Fatal Error Messages Received.
    pub const NONFATAL: u32 = 1 << 5;
    /// Fatal Error Messages Received.
    pub const FATAL: u32 = 1 << 6;
}

/// Root Error Command: Correctable / Non-Fatal / Fatal Error Reporting Enable (§7.8.4.9).
const ROOT_CMD_COR: u32 = 1 << 0;
const ROOT_CMD_NONFATAL: u32 = 1 << 1;
const ROOT_CMD_FATAL: u32 = 1 << 2;

/// The error message a function sends upstream (§6.2.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorMessage {
    /// ERR_COR.
    Correctable,
    /// ERR_NONFATAL.
    NonFatal,
    /// ERR_FATAL.
    Fatal,
}

/// Logs the error `bits` in the AER capability at `aer_at` of a function whose PCI Express
/// capability is at `pcie_at` (§6.2.5, Figure 6-2): Uncorrectable (`correctable` false) or
/// Correctable Error Status, First Error Pointer for the first unmasked uncorrectable error,
/// Device Status' error-detected bit. Returns the message the function sends: none when every
/// bit is masked or its reporting is disabled (Device Control's enables, or Command.SERR for
/// uncorrectable errors).
pub fn log_error(
    config: &mut ConfigSpace,
    aer_at: u16,
    pcie_at: u16,
    correctable: bool,
    bits: u32,
) -> Option<ErrorMessage> {
    let reg = |o: usize| aer_at + o as u16;
    let devctl = config.read_u16(pcie_at + DEVCTL as u16);
    let devsta_at = pcie_at + DEVSTA as u16;
    if correctable {
        let bits = bits & aer::COR_BITS;
        let status = config.read_u32(reg(aer::COR_STATUS));
        config.set_u32(reg(aer::COR_STATUS), status | bits);
        let unmasked = bits & !config.read_u32(reg(aer::COR_MASK));
        if unmasked == 0 {
            return None;
        }
        config.set_u16(devsta_at, config.read_u16(devsta_at) | DEVSTA_CED);
        return (devctl & DEVCTL_CERE != 0).then_some(ErrorMessage::Correctable);
    }
    let bits = bits & aer::UNCOR_BITS;
    let mask = config.read_u32(reg(aer::UNCOR_MASK));
    let status = config.read_u32(reg(aer::UNCOR_STATUS));
    config.set_u32(reg(aer::UNCOR_STATUS), status | bits);
    let unmasked = bits & !mask;
    if unmasked == 0 {
        return None;
    }
    if status & !mask == 0 {
        // First Error Pointer (Capabilities and Control bits 4:0).
        let control = config.read_u32(reg(aer::CAP_CONTROL));
        config.set_u32(
            reg(aer::CAP_CONTROL),
            (control & !0x1f) | unmasked.trailing_zeros(),
        );
    }
    let fatal = unmasked & config.read_u32(reg(aer::UNCOR_SEVERITY)) != 0;
    let (detected, enable, message) = if fatal {
        (DEVSTA_FED, DEVCTL_FERE, ErrorMessage::Fatal)
    } else {
        (DEVSTA_NFED, DEVCTL_NFERE, ErrorMessage::NonFatal)
    };
    config.set_u16(devsta_at, config.read_u16(devsta_at) | detected);
    let serr = config.read_u16(COMMAND) & COMMAND_SERR != 0;
    (devctl & enable != 0 || serr).then_some(message)
}

/// A Root Port (or RCEC) with its AER capability at `aer_at` receives `message` from the
/// function `source` (requester ID): Root Error Status and Error Source Identification record
/// it (§6.2.4.1.2, §7.8.4.10–11). Returns true when the Root Error Command enables the
/// interrupt for it (the port then signals its AER interrupt message).
pub fn root_receive(
    config: &mut ConfigSpace,
    aer_at: u16,
    message: ErrorMessage,
    source: u16,
) -> bool {
    let status_at = aer_at + aer::ROOT_STATUS as u16;
    let source_at = aer_at + aer::ERROR_SOURCE as u16;
    let mut status = config.read_u32(status_at);
    let mut ids = config.read_u32(source_at);
    let enable = match message {
        ErrorMessage::Correctable => {
            if status & root_status::COR != 0 {
                status |= root_status::MULTI_COR;
            } else {
                status |= root_status::COR;
                ids = (ids & 0xffff_0000) | u32::from(source);
            }
            ROOT_CMD_COR
        }
        ErrorMessage::NonFatal | ErrorMessage::Fatal => {
            if status & root_status::UNCOR != 0 {
                status |= root_status::MULTI_UNCOR;
            } else {
                status |= root_status::UNCOR;
                ids = (ids & 0xffff) | u32::from(source) << 16;
                if message == ErrorMessage::Fatal {
                    status |= root_status::FIRST_FATAL;
                }
            }
            if message == ErrorMessage::Fatal {
                status |= root_status::FATAL;
                ROOT_CMD_FATAL
            } else {
                status |= root_status::NONFATAL;
                ROOT_CMD_NONFATAL
            }
        }
    };
    config.set_u32(status_at, status);
    config.set_u32(source_at, ids);
    config.read_u32(aer_at + aer::ROOT_COMMAND as u16) & enable != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::capability::aer_capability;
    use crate::pci::{HeaderType, PciIds, PcieCapabilityConfig};

    const IDS: PciIds = PciIds {
        vendor_id: 0x1b36,
        device_id: 1,
        revision_id: 0,
        class_code: 0x05_02_10,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
    };

    fn endpoint() -> (ConfigSpace, u16, u16) {
        let mut c = ConfigSpace::new(HeaderType::Type0, IDS);
        let pcie = u16::from(
            c.add_capability(&PcieCapabilityConfig::endpoint().build())
                .unwrap(),
        );
        let aer = c.add_ext_capability(&aer_capability(false)).unwrap();
        (c, pcie, aer)
    }

    #[test]
    fn masked_or_disabled_errors_send_nothing() {
        let (mut c, pcie, aer) = endpoint();
        // Internal errors are masked by default (PCIe r6.0 §7.8.4.3/.6).
        assert_eq!(log_error(&mut c, aer, pcie, true, COR_INTERNAL), None);
        assert_eq!(log_error(&mut c, aer, pcie, false, UNCOR_INTERNAL), None);
        assert_eq!(c.read_u32(aer + aer::COR_STATUS as u16), COR_INTERNAL);
        // Unmasked but reporting disabled: logged, no message.
        c.set_u32(aer + aer::COR_MASK as u16, 0);
        assert_eq!(log_error(&mut c, aer, pcie, true, COR_INTERNAL), None);
        assert_eq!(c.read_u16(pcie + DEVSTA as u16) & DEVSTA_CED, DEVSTA_CED);
    }

    #[test]
    fn enabled_errors_reach_the_root_port_with_their_source() {
        let (mut c, pcie, aer) = endpoint();
        c.set_u32(aer + aer::COR_MASK as u16, 0);
        c.set_u32(aer + aer::UNCOR_MASK as u16, 0);
        c.set_u16(
            pcie + DEVCTL as u16,
            DEVCTL_CERE | DEVCTL_NFERE | DEVCTL_FERE,
        );
        assert_eq!(
            log_error(&mut c, aer, pcie, true, COR_INTERNAL),
            Some(ErrorMessage::Correctable)
        );
        // UIE is fatal by default; made non-fatal it sends ERR_NONFATAL.
        assert_eq!(
            log_error(&mut c, aer, pcie, false, UNCOR_INTERNAL),
            Some(ErrorMessage::Fatal)
        );
        assert_eq!(c.read_u32(aer + aer::CAP_CONTROL as u16) & 0x1f, 22);
        c.set_u32(aer + aer::UNCOR_SEVERITY as u16, 0);
        assert_eq!(
            log_error(&mut c, aer, pcie, false, UNCOR_INTERNAL),
            Some(ErrorMessage::NonFatal)
        );

        let mut rp = ConfigSpace::new(HeaderType::Type1, IDS);
        let raer = rp.add_ext_capability(&aer_capability(true)).unwrap();
        // Reporting disabled at the root: recorded, no interrupt.
        assert!(!root_receive(
            &mut rp,
            raer,
            ErrorMessage::Correctable,
            0x0d00
        ));
        rp.set_u32(raer + aer::ROOT_COMMAND as u16, 0x7);
        assert!(root_receive(
            &mut rp,
            raer,
            ErrorMessage::Correctable,
            0x0d00
        ));
        assert!(root_receive(&mut rp, raer, ErrorMessage::Fatal, 0x0e00));
        let status = rp.read_u32(raer + aer::ROOT_STATUS as u16);
        assert_eq!(
            status,
            root_status::COR
                | root_status::MULTI_COR
                | root_status::UNCOR
                | root_status::FIRST_FATAL
                | root_status::FATAL
        );
        assert_eq!(rp.read_u32(raer + aer::ERROR_SOURCE as u16), 0x0e00_0d00);
        // The guest clears what it handled (RW1C).
        rp.write(raer + aer::ROOT_STATUS as u16, &status.to_le_bytes());
        assert_eq!(rp.read_u32(raer + aer::ROOT_STATUS as u16), 0);
    }
}
