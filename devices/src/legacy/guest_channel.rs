//! The project's guest channel: two write-only I/O ports the guest init reaches through
//! `/dev/port` (`dd of=/dev/port seek=PORT`). Port +0 takes boot markers (1 = init started),
//! port +1 the command's exit status. Reads return 0xff.

use std::sync::Arc;

use super::PlatformEvents;
use crate::bus::BusDevice;

pub struct GuestChannel {
    events: Arc<dyn PlatformEvents>,
}

impl GuestChannel {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for GuestChannel {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // /dev/port writes byte by byte; a wider OUT counts as its low byte.
        let Some(&value) = data.first() else { return };
        match offset {
            0 => self.events.guest_marker(value),
            1 => self.events.exit_status(value),
            _ => log::debug!("guest channel: write to unknown offset {offset}"),
        }
    }
}
