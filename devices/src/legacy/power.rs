//! Power and reset controls.
//!
//! [`PowerRegisters`] models the ACPI HW-reduced sleep control, sleep status and reset registers
//! that our FADT points at (ACPI 6.x 4.8.3.7 "Sleep Control and Status Registers", 4.8.3.6
//! "Reset Register"): Linux's `acpi_hw_extended_sleep` writes `SLP_TYPx << 2 | SLP_EN` to the
//! control register to enter S5, and `acpi_reboot` writes the reset value to the reset register.
//! [`I8042Reset`] is the keyboard controller's CPU reset line (command 0xFE on port 0x64) and
//! [`ResetControl`] the PIIX/ICH reset control register at 0xCF9 — fallbacks Linux's
//! `native_machine_emergency_restart` tries.

use std::sync::Arc;

use super::PlatformEvents;
use crate::bus::BusDevice;

const SLP_EN: u8 = 1 << 5;

/// Sleep control (+0), sleep status (+1) and reset (+2) registers, 8 bits each.
pub struct PowerRegisters {
    events: Arc<dyn PlatformEvents>,
    s5_sleep_type: u8,
    reset_value: u8,
}

impl PowerRegisters {
    pub fn new(events: Arc<dyn PlatformEvents>, s5_sleep_type: u8, reset_value: u8) -> Self {
        Self {
            events,
            s5_sleep_type,
            reset_value,
        }
    }
}

impl BusDevice for PowerRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear; nothing else to report.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLP_EN != 0 => {
                let sleep_type = (value >> 2) & 0x7;
                if sleep_type == self.s5_sleep_type {
                    self.events.power_off();
                } else {
                    log::warn!("guest requested unsupported sleep type {sleep_type}");
                }
            }
            2 if value == self.reset_value => self.events.reset(),
            _ => {}
        }
    }
}

/// i8042 command port (0x64): command 0xFE pulses the CPU reset line. Status reads report an
/// empty controller so probing drivers give up quickly.
pub struct I8042Reset {
    events: Arc<dyn PlatformEvents>,
}

impl I8042Reset {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&0xfe) {
            self.events.reset();
        }
    }
}

/// Reset control register at 0xCF9: writing with bit 2 (RST_CPU) set resets the system.
pub struct ResetControl {
    events: Arc<dyn PlatformEvents>,
    value: u8,
}

impl ResetControl {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self { events, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.value);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.value = value & 0x0e;
        if value & 0x04 != 0 {
            self.events.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Recorder(pub Mutex<Vec<String>>);
    impl PlatformEvents for Recorder {
        fn power_off(&self) {
            self.0.lock().unwrap().push("off".into());
        }
        fn reset(&self) {
            self.0.lock().unwrap().push("reset".into());
        }
        fn guest_marker(&self, code: u8) {
            self.0.lock().unwrap().push(format!("marker {code}"));
        }
        fn exit_status(&self, status: u8) {
            self.0.lock().unwrap().push(format!("status {status}"));
        }
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let rec = Arc::new(Recorder::default());
        let mut regs = PowerRegisters::new(rec.clone(), 5, 1);
        regs.write(0, &[(5 << 2) | SLP_EN]);
        regs.write(0, &[5 << 2]); // SLP_EN clear: nothing
        regs.write(0, &[(3 << 2) | SLP_EN]); // S3: unsupported, ignored
        regs.write(2, &[2]); // wrong reset value
        regs.write(2, &[1]);
        assert_eq!(*rec.0.lock().unwrap(), vec!["off", "reset"]);
    }

    #[test]
    fn i8042_and_cf9_reset() {
        let rec = Arc::new(Recorder::default());
        I8042Reset::new(rec.clone()).write(0, &[0xd1]);
        I8042Reset::new(rec.clone()).write(0, &[0xfe]);
        let mut cf9 = ResetControl::new(rec.clone());
        cf9.write(0, &[0x02]);
        cf9.write(0, &[0x06]);
        assert_eq!(*rec.0.lock().unwrap(), vec!["reset", "reset"]);
    }

    #[test]
    fn guest_channel_markers_and_status() {
        let rec = Arc::new(Recorder::default());
        let mut ch = crate::legacy::GuestChannel::new(rec.clone());
        ch.write(0, &[1]);
        ch.write(1, &[7]);
        ch.write(1, &[]);
        ch.write(5, &[3]);
        let mut b = [0u8; 2];
        ch.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(*rec.0.lock().unwrap(), vec!["marker 1", "status 7"]);
    }
}
