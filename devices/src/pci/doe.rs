//! PCIe Data Object Exchange (DOE) mailbox: extended capability 0x2E (PCIe r6.0 §6.30, §7.9.24),
//! as Linux's `drivers/pci/doe.c` drives it.
//!
//! The guest writes a request data object dword by dword into the Write Data Mailbox, then sets
//! Go; the response is built at once (Busy never shows) and Data Object Ready set. The guest
//! reads the Read Data Mailbox and writes it (any value) to move to the next dword; Ready clears
//! after the last one. Abort drops everything and clears Error. A malformed request (shorter
//! than its header says, longer than [`MAX_REQUEST_DWORDS`], an unknown protocol, or one the
//! protocol refuses) sets Error and produces no response, as the specification's "the DOE
//! instance could not process the request" case.
//!
//! Data object header: DW0 = vendor ID \[15:0\] | type \[23:16\]; DW1 = length in dwords,
//! header included, \[17:0\]. Discovery (vendor 0x0001, type 0) is built in: index 0 is
//! discovery itself, then the protocols given to [`DoeMailbox::new`] in order.

use super::capability::ExtendedCapability;

/// Extended capability ID of DOE.
pub const CAP_ID: u16 = 0x2e;
/// Size of the capability in config space.
pub const SIZE: usize = 0x18;

/// Register offsets from the capability's base.
pub mod reg {
    /// DOE Capabilities (no interrupt support: Linux polls).
    pub const CAPABILITIES: u16 = 0x04;
    /// DOE Control: Abort \[0\], Interrupt Enable \[1\], Go \[31\].
    pub const CONTROL: u16 = 0x08;
    /// DOE Status: Busy \[0\], Interrupt Status \[1\], Error \[2\], Data Object Ready \[31\].
    pub const STATUS: u16 = 0x0c;
    /// DOE Write Data Mailbox.
    pub const WRITE_MAILBOX: u16 = 0x10;
    /// DOE Read Data Mailbox.
    pub const READ_MAILBOX: u16 = 0x14;
}

/// Control: abort the exchange in progress.
pub const CONTROL_ABORT: u32 = 1;
/// Control: the request in the write mailbox is complete.
pub const CONTROL_GO: u32 = 1 << 31;
/// Status: the request could not be processed.
pub const STATUS_ERROR: u32 = 1 << 2;
/// Status: a response is ready in the read mailbox.
pub const STATUS_READY: u32 = 1 << 31;

/// The longest request accepted, in dwords (discovery and CXL table access need 3).
pub const MAX_REQUEST_DWORDS: usize = 64;

/// PCI-SIG vendor ID (discovery protocol).
pub const PCI_SIG_VENDOR: u16 = 0x0001;
/// Discovery's data object type.
pub const DISCOVERY_TYPE: u8 = 0;

/// A protocol served over the mailbox.
pub trait DoeProtocol: Send {
    /// Vendor ID and data object type of its requests and responses.
    fn protocol(&self) -> (u16, u8);
    /// The response payload (after the 2-dword header) to a request payload, or `None` when the
    /// request is invalid (the mailbox then sets Error).
    fn respond(&self, request: &[u32]) -> Option<Vec<u32>>;
}

/// One DOE instance: mailbox state and the protocols it serves.
pub struct DoeMailbox {
    protocols: Vec<Box<dyn DoeProtocol>>,
    request: Vec<u32>,
    response: Vec<u32>,
    read_pos: usize,
    error: bool,
}

impl std::fmt::Debug for DoeMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoeMailbox")
            .field("protocols", &self.protocols.len())
            .field("request", &self.request.len())
            .field("response", &self.response.len())
            .field("read_pos", &self.read_pos)
            .field("error", &self.error)
            .finish()
    }
}

impl DoeMailbox {
    /// A mailbox serving discovery and `protocols`.
    pub fn new(protocols: Vec<Box<dyn DoeProtocol>>) -> Self {
        DoeMailbox {
            protocols,
            request: Vec::new(),
            response: Vec::new(),
            read_pos: 0,
            error: false,
        }
    }

    /// The capability to place in config space (version 1, no interrupt). Its registers past
    /// the header are served by [`DoeMailbox::read`] / [`DoeMailbox::write`].
    pub fn capability() -> ExtendedCapability {
        ExtendedCapability::new(CAP_ID, 1, SIZE)
    }

    /// Whether `offset` (from the capability's base) is a register this mailbox serves.
    pub fn serves(offset: u16) -> bool {
        (reg::CONTROL..reg::READ_MAILBOX + 4).contains(&offset)
    }

    /// Reads the dword register at `offset` (from the capability's base).
    pub fn read(&self, offset: u16) -> u32 {
        match offset {
            reg::STATUS => {
                let ready = self.read_pos < self.response.len();
                (if self.error { STATUS_ERROR } else { 0 }) | if ready { STATUS_READY } else { 0 }
            }
            reg::READ_MAILBOX => self.response.get(self.read_pos).copied().unwrap_or(0),
            // Control (Abort and Go read 0), the write mailbox and anything else read 0.
            _ => 0,
        }
    }

    /// Writes the dword register at `offset` (from the capability's base).
    pub fn write(&mut self, offset: u16, value: u32) {
        match offset {
            reg::CONTROL => {
                if value & CONTROL_ABORT != 0 {
                    self.abort();
                } else if value & CONTROL_GO != 0 {
                    self.go();
                }
            }
            // Past the limit the request is refused at Go anyway: stop storing.
            reg::WRITE_MAILBOX if self.request.len() <= MAX_REQUEST_DWORDS => {
                self.request.push(value);
            }
            reg::READ_MAILBOX if self.read_pos < self.response.len() => {
                self.read_pos += 1;
            }
            _ => {}
        }
    }

    /// Abort (also the state after a function reset).
    pub fn abort(&mut self) {
        self.request.clear();
        self.response.clear();
        self.read_pos = 0;
        self.error = false;
    }

    fn go(&mut self) {
        let request = std::mem::take(&mut self.request);
        self.response.clear();
        self.read_pos = 0;
        match self.process(&request) {
            Some(response) => self.response = response,
            None => self.error = true,
        }
    }

    fn process(&self, request: &[u32]) -> Option<Vec<u32>> {
        if request.len() < 2 || request.len() > MAX_REQUEST_DWORDS {
            return None;
        }
        let vendor = request[0] as u16;
        let kind = (request[0] >> 16) as u8;
        let length = match request[1] & 0x3_ffff {
            0 => 1 << 18,
            n => n as usize,
        };
        if length != request.len() {
            return None;
        }
        let payload = &request[2..];
        let body = if (vendor, kind) == (PCI_SIG_VENDOR, DISCOVERY_TYPE) {
            self.discover(payload)?
        } else {
            self.protocols
                .iter()
                .find(|p| p.protocol() == (vendor, kind))?
                .respond(payload)?
        };
        let mut response = Vec::with_capacity(2 + body.len());
        response.push(request[0] & 0x00ff_ffff);
        response.push((2 + body.len()) as u32);
        response.extend(body);
        Some(response)
    }

    /// Discovery: DW2 of the request is index \[7:0\]; the response names that protocol and the
    /// next index (0 after the last).
    fn discover(&self, payload: &[u32]) -> Option<Vec<u32>> {
        let index = (*payload.first()? & 0xff) as usize;
        let (vendor, kind) = if index == 0 {
            (PCI_SIG_VENDOR, DISCOVERY_TYPE)
        } else {
            self.protocols.get(index - 1)?.protocol()
        };
        let next = if index < self.protocols.len() {
            index + 1
        } else {
            0
        };
        Some(vec![
            u32::from(vendor) | u32::from(kind) << 16 | (next as u32) << 24,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl DoeProtocol for Echo {
        fn protocol(&self) -> (u16, u8) {
            (0x1e98, 2)
        }
        fn respond(&self, request: &[u32]) -> Option<Vec<u32>> {
            (request.first() != Some(&0xdead)).then(|| request.to_vec())
        }
    }

    /// Sends a request the way pci_doe_send_req does and reads the response the way
    /// pci_doe_recv_resp does; `None` when Error is set.
    fn exchange(mb: &mut DoeMailbox, request: &[u32]) -> Option<Vec<u32>> {
        for &dw in request {
            mb.write(reg::WRITE_MAILBOX, dw);
        }
        mb.write(reg::CONTROL, CONTROL_GO);
        if mb.read(reg::STATUS) & STATUS_ERROR != 0 {
            assert_eq!(mb.read(reg::STATUS) & STATUS_READY, 0);
            return None;
        }
        let mut out = Vec::new();
        while mb.read(reg::STATUS) & STATUS_READY != 0 {
            out.push(mb.read(reg::READ_MAILBOX));
            mb.write(reg::READ_MAILBOX, 0);
        }
        Some(out)
    }

    #[test]
    fn discovery_lists_itself_then_the_protocols() {
        let mut mb = DoeMailbox::new(vec![Box::new(Echo)]);
        assert_eq!(
            exchange(&mut mb, &[0x0001, 3, 0]),
            Some(vec![0x0001, 3, 0x0001 | 1 << 24])
        );
        assert_eq!(
            exchange(&mut mb, &[0x0001, 3, 1]),
            Some(vec![0x0001, 3, 0x1e98 | 2 << 16])
        );
        // Past the end: Error until Abort.
        assert_eq!(exchange(&mut mb, &[0x0001, 3, 2]), None);
        assert_ne!(mb.read(reg::STATUS) & STATUS_ERROR, 0);
        mb.write(reg::CONTROL, CONTROL_ABORT);
        assert_eq!(mb.read(reg::STATUS), 0);
    }

    #[test]
    fn a_protocol_answers_with_its_own_header() {
        let mut mb = DoeMailbox::new(vec![Box::new(Echo)]);
        assert_eq!(
            exchange(&mut mb, &[0x0002_1e98, 4, 7, 8]),
            Some(vec![0x0002_1e98, 4, 7, 8])
        );
        // Control reads back with Go clear; the mailbox is empty again.
        assert_eq!(mb.read(reg::CONTROL), 0);
        assert_eq!(mb.read(reg::READ_MAILBOX), 0);
    }

    #[test]
    fn malformed_requests_set_error_and_answer_nothing() {
        let cases: [&[u32]; 5] = [
            &[],                       // nothing written
            &[0x0002_1e98],            // no length
            &[0x0002_1e98, 5, 1],      // shorter than its length
            &[0x0007_1e98, 3, 1],      // unknown protocol
            &[0x0002_1e98, 3, 0xdead], // the protocol refuses it
        ];
        for request in cases {
            let mut mb = DoeMailbox::new(vec![Box::new(Echo)]);
            assert_eq!(exchange(&mut mb, request), None, "{request:x?}");
        }
        // Far too long: the mailbox stops storing and refuses it.
        let mut mb = DoeMailbox::new(vec![Box::new(Echo)]);
        let mut long = vec![0x0002_1e98, 1000];
        long.resize(1000, 0);
        assert_eq!(exchange(&mut mb, &long), None);
        mb.write(reg::CONTROL, CONTROL_ABORT);
        assert_eq!(exchange(&mut mb, &[0x0001, 3, 0]).map(|r| r.len()), Some(3));
    }

    #[test]
    fn reading_past_the_response_and_abort_mid_response() {
        let mut mb = DoeMailbox::new(vec![Box::new(Echo)]);
        for dw in [0x0001, 3, 0] {
            mb.write(reg::WRITE_MAILBOX, dw);
        }
        mb.write(reg::CONTROL, CONTROL_GO);
        mb.write(reg::READ_MAILBOX, 0);
        assert_ne!(mb.read(reg::STATUS) & STATUS_READY, 0);
        mb.write(reg::CONTROL, CONTROL_ABORT);
        assert_eq!(mb.read(reg::STATUS), 0);
        for _ in 0..5 {
            mb.write(reg::READ_MAILBOX, 0);
        }
        assert_eq!(mb.read(reg::READ_MAILBOX), 0);
    }
}
