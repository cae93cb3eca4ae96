//! MSI delivery seam: devices hand an [`MsiMessage`] to an [`MsiSink`].

use std::sync::Mutex;

use thiserror::Error;

use crate::RequesterId;

/// One MSI/MSI-X message write (PCI Local Bus Spec 3.0, 6.8; PCIe Base Spec r6.0, 6.1.4): a DWORD
/// memory write of `data` to `address`, tagged with the requester ID of the function that sent it
/// (the source ID VT-d interrupt remapping validates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (x86: 0xFEEx_xxxx; remappable format when interrupt remapping is on).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Requester ID of the sending function.
    pub requester_id: RequesterId,
}

/// Why an MSI could not be delivered.
#[derive(Debug, Error)]
pub enum MsiError {
    /// The message does not target the interrupt address range, or is otherwise malformed.
    #[error("invalid MSI address {address:#x} data {data:#x}")]
    InvalidMessage {
        /// Message address.
        address: u64,
        /// Message data.
        data: u32,
    },
    /// Interrupt remapping rejected the message (fault recorded by the IOMMU).
    #[error("interrupt remapping fault for {requester_id}: {reason}")]
    RemappingFault {
        /// Source of the message.
        requester_id: RequesterId,
        /// Human-readable fault reason.
        reason: String,
    },
    /// The hypervisor refused the injection (e.g. KVM_SIGNAL_MSI failed).
    #[error("MSI injection failed: {0}")]
    Injection(#[from] std::io::Error),
}

/// Where devices send MSI/MSI-X messages. The VMM implements this once (KVM_SIGNAL_MSI); the
/// VT-d interrupt-remapping model will wrap it.
pub trait MsiSink: Send + Sync {
    /// Delivers one message. Errors are reported to the caller, which logs them: a guest can
    /// always program a bogus message, so this must never panic.
    fn deliver(&self, msg: MsiMessage) -> Result<(), MsiError>;
}

/// An [`MsiSink`] that drops every message (for devices that are never expected to interrupt,
/// and for fuzzing).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullMsiSink;

impl MsiSink for NullMsiSink {
    fn deliver(&self, _msg: MsiMessage) -> Result<(), MsiError> {
        Ok(())
    }
}

/// An [`MsiSink`] that records every message it is given (tests, fuzzing, fault plans).
#[derive(Debug, Default)]
pub struct RecordingMsiSink {
    messages: Mutex<Vec<MsiMessage>>,
}

impl RecordingMsiSink {
    /// Creates an empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns and clears the messages delivered so far.
    pub fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.lock())
    }

    /// Number of messages delivered since the last [`RecordingMsiSink::take`].
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True if nothing was delivered since the last [`RecordingMsiSink::take`].
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<MsiMessage>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MsiSink for RecordingMsiSink {
    fn deliver(&self, msg: MsiMessage) -> Result<(), MsiError> {
        self.lock().push(msg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn recording_sink_records_and_takes() {
        let sink = Arc::new(RecordingMsiSink::new());
        let dyn_sink: Arc<dyn MsiSink> = sink.clone();
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
            requester_id: RequesterId::new(1, 0, 0),
        };
        dyn_sink.deliver(msg).unwrap();
        assert_eq!(sink.len(), 1);
        assert_eq!(sink.take(), vec![msg]);
        assert!(sink.is_empty());
        NullMsiSink.deliver(msg).unwrap();
    }
}
