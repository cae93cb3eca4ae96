//! The Intel VT-d remapping hardware model (Intel Virtualization Technology for Directed I/O
//! Architecture Specification, rev 4.1), organised like the specification's chapters:
//! - [`registers`]: the register file of a remapping unit (chapter 11), with the Global
//!   Command/Status semantics Linux relies on, fault recording and the invalidation queue
//!   registers;
//! - [`tables`]: legacy-mode root and context entries and the second-stage walk (chapters 9
//!   and 3.6), with the architected fault reasons;
//! - [`scalable`]: scalable-mode root/context entries, PASID directory and table entries, and
//!   the first-stage (x86 4-level) walk with Accessed/Dirty updates;
//! - [`unit`]: one remapping unit — registers, queued invalidation, fault and invalidation
//!   events, and the translation of DMA requests ([`unit::VtdTranslator`], the
//!   `DmaTranslator` for the devices behind the unit);
//! - [`cache`]: caching translation information (chapter 6) — the context cache, PASID cache
//!   and IOTLB, and their invalidation at every granularity.
//!
//! Still to come (issue 8): ATS translation requests (ECAP.DT), the page request queue
//! (part 2).

pub mod cache;
pub mod registers;
pub mod scalable;
pub mod tables;
pub mod unit;
