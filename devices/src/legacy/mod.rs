//! Legacy platform devices: 16550 UARTs, the ACPI HW-reduced power/reset registers, the i8042
//! reset line, and the guest channel the project's guest init uses.

mod guest_channel;
mod power;
mod serial;

pub use guest_channel::GuestChannel;
pub use power::{I8042Reset, PowerRegisters, ResetControl};
pub use serial::{EventFdTrigger, SerialPort};

/// What the platform devices tell the VMM.
pub trait PlatformEvents: Send + Sync {
    /// The guest asked to power off (ACPI S5).
    fn power_off(&self);
    /// The guest asked for a reset (ACPI reset register, i8042, port 0xCF9).
    fn reset(&self);
    /// The guest init passed a boot-progress marker.
    fn guest_marker(&self, code: u8);
    /// The guest init reported the command's exit status.
    fn exit_status(&self, status: u8);
}
