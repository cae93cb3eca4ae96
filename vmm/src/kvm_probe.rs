//! Placeholder (being written): probes whether /dev/kvm can run a stock guest.
/// Result of the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// Capable.
    Capable,
    /// Incapable.
    Incapable(String),
    /// No KVM.
    NoKvm(String),
}
/// Probe.
pub fn probe_stock_guest_support() -> ProbeResult {
    ProbeResult::Incapable("probe not implemented yet".into())
}
